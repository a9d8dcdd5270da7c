"""Token dropping: the middle layers of a transformer process only a subset of the sequence's tokens.

Two strategies (survey arXiv 2302.01107, "Computation efficiency / Token dropping"):

``random`` -- random-LTD, Yao et al. 2022, "Random-LTD: Random and Layerwise Token Dropping Brings Efficient
Training for Large-scale Transformers", arXiv 2211.11586. Every dropping layer l draws, independently of the other
layers, a random sorted index set I_l (|I_l| = K for every row of the batch) and computes::

    h_out[:, I_l] = Layer_l(h_in[:, I_l]; mask[I_l, I_l], rope[I_l])      h_out[:, not I_l] = h_in[:, not I_l]

Sorting keeps causal order, so the causal mask of the subsequence is the original mask restricted to rows and
columns I_l; rotary position embeddings (cos, sin) are gathered with the tokens, so a kept token keeps its original
position. The first and last layers always see all tokens (``full_first``/``full_last``).

``importance`` -- Hou et al. 2022, "Token Dropping for Efficient BERT Pretraining", arXiv 2203.13240, for masked-LM
encoders. Each vocabulary id v has an importance m_v, the exponential moving average of its MLM loss (the official
implementation's rule, beta = 0.995, m_v initialised to 10)::

    m_v <- beta * m_v + (1 - beta) * mean(CE loss of the masked positions whose target is v in this batch)

The K positions with the largest m_{x_i} are kept in the middle layers (layers full_first..L-full_last-1, default
from L/2 on); special tokens always rank first, padding last. One index set per forward pass, shared by all middle
layers, so dropped tokens skip them and rejoin before the last layer(s). (The official code also lets the first
dropping layer's kept queries attend to all tokens; here kept tokens attend to kept tokens only.)

Kept count: K = keep * S rounded to a multiple of ``multiple_of`` (at least 1, at most S); keep follows a linear
schedule from ``keep_start`` to 1.0 over ``schedule_steps`` steps from ``start_step`` (keep_start before that).
With keep = 1.0, or in ``model.eval()``, the original layer forward runs untouched: outputs equal the unpatched
model's bitwise. Functional core: ``TokenDropper(model, ...)`` (``.keep``, ``.undo()``) and ``TokenDroppingCallback``
for the stock Trainer.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainerCallback, TrainingArguments

from ..errors import RecipeError
from ..layers import base_model, layer_stacks
from ..patching import Patches, patch_attr
from ..registry import register_technique
from ..technique import Technique, TechniqueConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DropPolicy:
    """How one decoder/encoder layer class takes its sequence-shaped arguments (names in its ``forward``)."""

    hidden: str = "hidden_states"
    mask: str = "attention_mask"  # 4D (B|1, heads|1, S, S) bool/additive, 2D (B, S) padding mask, or None
    rope: str | None = None  # (cos, sin), each (B|1, S, D), gathered with the tokens
    position_ids: str | None = None  # only read by attention kernels (flash varlen): renumbered per segment


_POLICIES: dict[str, DropPolicy] = {}


def register_drop_policy(layer_class: str, policy: DropPolicy) -> None:
    _POLICIES[layer_class] = policy


for _n in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"):
    register_drop_policy(_n, DropPolicy(rope="position_embeddings", position_ids="position_ids"))
register_drop_policy("GPT2Block", DropPolicy(position_ids="position_ids"))  # learned positions: added before layer 0
for _n in ("BertLayer", "RobertaLayer"):
    register_drop_policy(_n, DropPolicy())


def keep_fraction(step: int, keep_start: float, schedule_steps: int | None, start_step: int = 0) -> float:
    """Linear schedule keep_start -> 1.0 over ``schedule_steps`` from ``start_step``; None holds keep_start."""
    if schedule_steps is None or step <= start_step:
        return keep_start
    return keep_start + (1.0 - keep_start) * min(1.0, (step - start_step) / schedule_steps)


def kept_count(seq_len: int, keep: float, multiple_of: int = 8) -> int:
    """round(keep * S) to a multiple of ``multiple_of`` (tensor-core friendly shapes), clamped to [1, S]."""
    k = int(round(keep * seq_len / multiple_of)) * multiple_of
    if k == 0:
        k = round(keep * seq_len)
    return max(1, min(seq_len, k))


def gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[b, idx[b]] along ``dim`` (x's batch may be 1 and is broadcast to idx's)."""
    x = x.expand(idx.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    index = idx.view(shape).expand(*x.shape[:dim], idx.shape[1], *x.shape[dim + 1 :])
    return torch.gather(x, dim, index)


def gather_mask(mask: Any, idx: torch.Tensor) -> Any:
    """Restrict an attention mask to the kept rows and columns."""
    if mask is None:
        return None  # sdpa's is_causal on a sorted subsequence is the restricted causal mask
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"token_dropping cannot gather a {type(mask).__name__} mask (flex attention); use sdpa/eager")
    if mask.dim() == 2:
        return gather_seq(mask, idx, 1)
    if mask.dim() == 4:
        return gather_seq(gather_seq(mask, idx, 2), idx, 3)
    raise ValueError(f"unexpected attention mask shape {tuple(mask.shape)}")


def segment_positions(position_ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... per packed segment among the kept tokens: flash attention infers segments from restarts."""
    pos = position_ids.expand(idx.shape[0], -1)
    restart = torch.ones_like(pos, dtype=torch.long)
    restart[:, 1:] = (pos[:, 1:] - pos[:, :-1] != 1).long()
    seg = gather_seq(restart.cumsum(1), idx)
    new = torch.ones_like(seg, dtype=torch.bool)
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    ar = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
    return ar - torch.where(new, ar, 0).cummax(1).values


def flash_varlen_kwargs(positions: torch.Tensor) -> dict[str, Any]:
    """cu_seq_lens / max_length over the flattened (B, K) kept tokens, a segment starting at each position 0."""
    starts = (positions.reshape(-1) == 0).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


class _Args:
    """A call's arguments by name, whether passed positionally, by keyword, or inside ``**kwargs``."""

    def __init__(self, sig: inspect.Signature, args: tuple, kwargs: dict):
        self.bound = sig.bind(*args, **kwargs)
        self.var = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)

    def get(self, name: str) -> Any:
        a = self.bound.arguments
        return a[name] if name in a else a.get(self.var, {}).get(name) if self.var else None

    def set(self, name: str, value: Any) -> None:
        if name in self.bound.signature.parameters:
            self.bound.arguments[name] = value
        elif self.var and name in self.bound.arguments.get(self.var, {}):
            self.bound.arguments[self.var][name] = value

    def set_all(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.set(name, value)


def run_on_subset(forward: Any, sig: inspect.Signature, policy: DropPolicy, idx: torch.Tensor, args, kwargs):
    """Run ``forward`` on the tokens ``idx`` (B, K) and scatter its output back; others pass through unchanged."""
    call = _Args(sig, args, kwargs)
    hidden = call.get(policy.hidden)
    call.set(policy.hidden, gather_seq(hidden, idx))
    call.set(policy.mask, gather_mask(call.get(policy.mask), idx))
    if policy.rope and call.get(policy.rope) is not None:
        call.set(policy.rope, tuple(gather_seq(t, idx) for t in call.get(policy.rope)))
    if policy.position_ids and call.get(policy.position_ids) is not None:
        positions = segment_positions(call.get(policy.position_ids), idx)
        call.set(policy.position_ids, positions)
        if call.get("cu_seq_lens_q") is not None:  # flash varlen over packed rows: boundaries of the kept tokens
            call.set_all(flash_varlen_kwargs(positions))
    elif call.get("cu_seq_lens_q") is not None:
        raise ValueError("token_dropping needs position_ids alongside cu_seq_lens (packed flash attention)")
    out = forward(*call.bound.args, **call.bound.kwargs)
    sub = out[0] if isinstance(out, tuple) else out
    full = hidden.scatter(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), sub.to(hidden.dtype))
    return (full, *out[1:]) if isinstance(out, tuple) else full


class TokenImportance:
    """Per-vocabulary-id EMA of the MLM loss (Hou et al. 2022); specials always rank first, padding last.

    The scores follow the device of the ids they are used with, so selection needs no host round trip."""

    def __init__(self, vocab_size: int, special_ids=(), pad_id: int | None = None, init: float = 10.0, beta=0.995):
        self.scores = torch.full((vocab_size,), float(init))
        self.beta = beta
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[[i for i in special_ids if i is not None and i != pad_id and 0 <= i < vocab_size]] = True
        self.pad_id = pad_id

    def _to(self, device: torch.device) -> None:
        if self.scores.device != device:
            self.scores, self.special = self.scores.to(device), self.special.to(device)

    @torch.no_grad()
    def update(self, target_ids: torch.Tensor, losses: torch.Tensor) -> None:
        """One EMA step for each id among ``target_ids`` with the mean of its per-token losses (under DDP: over all
        processes' tokens)."""
        self._to(target_ids.device)
        ids = target_ids.reshape(-1)
        sums = torch.zeros_like(self.scores).index_add_(0, ids, losses.reshape(-1).float())
        counts = torch.bincount(ids, minlength=self.scores.numel()).float()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # one table for the global batch on every process: the same ranking everywhere, and the state that
            # process 0 checkpoints is every process's (exact resume under DDP)
            both = torch.stack([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[0], both[1]
        mean = sums / counts.clamp(min=1)
        self.scores.copy_(torch.where(counts > 0, self.beta * self.scores + (1 - self.beta) * mean, self.scores))

    @torch.no_grad()
    def select(self, input_ids: torch.Tensor, k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted indices (B, k) of the k highest-ranked positions of each row."""
        self._to(input_ids.device)
        rank = self.scores[input_ids].masked_fill(self.special[input_ids], float("inf"))
        dropped = input_ids == self.pad_id
        if attention_mask is not None:
            dropped |= attention_mask == 0
        rank = rank.masked_fill(dropped, float("-inf"))
        return torch.sort(rank, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values


class TokenDropper:
    """Patches the middle layers of ``model`` (by ``layer_stacks`` and a registered ``DropPolicy``).

    ``keep`` (set it each step) is the kept fraction; ``undo()`` restores the model. ``last_indices[i]`` holds the
    kept indices of layer i's last training forward (for inspection and tests).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        strategy: Literal["random", "importance"] = "random",
        keep: float = 1.0,
        full_first: int | None = None,
        full_last: int = 1,
        multiple_of: int = 8,
        seed: int = 0,
        importance: TokenImportance | None = None,
    ):
        stacks = layer_stacks(model)
        if len(stacks) != 1:
            raise RecipeError("model.name_or_path", "token_dropping supports decoder-only or encoder-only models")
        if strategy == "importance" and (importance is None or "encoder" not in stacks):
            raise RecipeError(
                "techniques.token_dropping.strategy", "importance needs a masked-LM encoder (e.g. BertForMaskedLM)"
            )
        layers = next(iter(stacks.values()))
        n = len(layers)
        first = full_first if full_first is not None else (1 if strategy == "random" else n // 2)
        self.layer_ids = list(range(first, n - full_last))
        if not self.layer_ids:
            raise RecipeError(
                "techniques.token_dropping.full_first",
                f"no layer left to drop tokens in: {n} layers, full_first={first}, full_last={full_last}",
            )
        self.strategy, self.keep, self.multiple_of = strategy, keep, multiple_of
        self.importance = importance
        self.generator = torch.Generator().manual_seed(seed)
        self.last_indices: dict[int, torch.Tensor] = {}
        self._shared: torch.Tensor | None = None  # importance: this forward's kept indices
        self.patches = Patches()
        self._hooks: list[Any] = []
        for i in self.layer_ids:
            layer = layers[i]
            policy = _POLICIES.get(type(layer).__name__)
            if policy is None:
                supported = ", ".join(sorted(_POLICIES))
                msg = f"token_dropping has no policy for {type(layer).__name__}; supported: {supported}"
                raise RecipeError("model.name_or_path", msg)
            self.patches.add(patch_attr(layer, "forward", self._make_forward(i, layer, policy)))
        if strategy == "importance":
            self._hooks.append(base_model(model).register_forward_pre_hook(self._select, with_kwargs=True))
            self._hooks.append(model.register_forward_hook(self._record_loss, with_kwargs=True))

    def _make_forward(self, i: int, layer: torch.nn.Module, policy: DropPolicy):
        original = layer.forward  # may already be another technique's wrapper (layer dropping): chained
        sig = inspect.signature(type(layer).forward.__get__(layer))  # the class's own parameter names

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not layer.training or self.keep >= 1.0:
                return original(*args, **kwargs)
            hidden = _Args(sig, args, kwargs).get(policy.hidden)
            idx = self._indices(hidden)
            if idx is None:
                return original(*args, **kwargs)
            self.last_indices[i] = idx
            return run_on_subset(original, sig, policy, idx, args, kwargs)

        return forward

    def _indices(self, hidden: torch.Tensor) -> torch.Tensor | None:
        b, s = hidden.shape[:2]
        k = kept_count(s, self.keep, self.multiple_of)
        if k >= s:
            return None
        if self.strategy == "importance":
            return self._shared
        # One seed from the CPU generator (its state is what resume restores); the draw itself runs on the
        # hidden states' device, so no host-device copy stalls the GPU at every layer.
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        g = torch.Generator(device=hidden.device).manual_seed(seed)
        keys = torch.rand(b, s, generator=g, device=hidden.device)
        return keys.argsort(dim=1)[:, :k].sort(dim=1).values

    def _select(self, module, args, kwargs):
        self._shared = None
        if not module.training or self.keep >= 1.0:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("token_dropping strategy 'importance' needs input_ids (not inputs_embeds)")
        k = kept_count(ids.shape[1], self.keep, self.multiple_of)
        if k < ids.shape[1]:
            self._shared = self.importance.select(ids, k, kwargs.get("attention_mask"))
        return None

    def _record_loss(self, module, args, kwargs, output):
        labels = kwargs.get("labels")
        logits = getattr(output, "logits", None)
        if not module.training or labels is None or logits is None:
            return None
        with torch.no_grad():
            sel = labels != -100
            losses = torch.nn.functional.cross_entropy(logits[sel].float(), labels[sel], reduction="none")
            self.importance.update(labels[sel], losses)
        return None

    def undo(self) -> None:
        self.patches.undo()
        while self._hooks:
            self._hooks.pop().remove()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.importance is not None:
            state["importance"] = self.importance.scores.cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.importance is not None and "importance" in state:
            self.importance.scores.copy_(state["importance"].to(self.importance.scores.device))


class TokenDroppingCallback(TrainerCallback):
    """Stock-Trainer wiring: sets ``dropper.keep`` from the schedule at every step."""

    def __init__(self, dropper: TokenDropper, keep_start: float, schedule_steps: int | None, start_step: int = 0):
        self.dropper, self.args = dropper, (keep_start, schedule_steps, start_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.dropper.keep = keep_fraction(state.global_step, *self.args)


class TokenDroppingConfig(TechniqueConfig):
    name: Literal["token_dropping"] = "token_dropping"
    strategy: Literal["random", "importance"] = Field(
        "random", description="random: random-LTD (decoders or encoders); importance: Hou et al. (masked-LM encoders)"
    )
    keep_start: float = Field(0.5, gt=0, le=1, description="Kept fraction of tokens in the dropping layers at first.")
    schedule: Literal["linear", "constant"] = Field(
        "linear", description="linear: keep grows to 1.0 over schedule_steps; constant: keep_start throughout."
    )
    schedule_steps: int | None = Field(
        None, ge=1, description="Steps from keep_start to 1.0; null: training.max_steps - start_step."
    )
    start_step: int = Field(0, ge=0, description="Step at which keep starts to grow (keep_start before).")
    full_first: int | None = Field(
        None, ge=1, description="First layers that see all tokens; null: 1 (random) or num_layers // 2 (importance)."
    )
    full_last: int = Field(1, ge=1, description="Last layers that see all tokens (dropped tokens rejoin before).")
    multiple_of: int = Field(8, ge=1, description="Kept count is rounded to a multiple of this (at least 1).")
    seed: int | None = Field(None, description="Seed of the random-LTD generator; null: training.seed.")
    importance_beta: float = Field(0.995, ge=0, lt=1, description="EMA factor of the per-token-id MLM loss.")
    importance_init: float = Field(10.0, description="Initial importance of a token id never seen masked yet.")


@register_technique
class TokenDroppingTechnique(Technique):
    """Patches the middle layers in ``on_model``; ``on_batch`` sets the kept fraction from the global step."""

    name = "token_dropping"
    Config = TokenDroppingConfig
    survey_section = "Computation efficiency / Token dropping"
    paper = (
        'Yao et al. 2022, "Random-LTD: Random and Layerwise Token Dropping Brings Efficient Training for Large-scale '
        'Transformers", arXiv 2211.11586; Hou et al. 2022, "Token Dropping for Efficient BERT Pretraining", '
        "arXiv 2203.13240"
    )

    config: TokenDroppingConfig

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.dropper: TokenDropper | None = None
        self.tokenizer: Any = None
        self._seed = self.config.seed if self.config.seed is not None else 42
        self._steps: int | None = self.config.schedule_steps

    def validate(self, recipe: Any, env: Any) -> None:
        c = self.config
        if (recipe.model.attn_implementation or "").startswith("flex"):
            raise RecipeError("", "cannot gather flex_attention block masks; use model.attn_implementation sdpa/eager")
        if c.strategy == "importance" and recipe.model.task not in ("auto", "masked_lm"):
            raise RecipeError("strategy", f"importance needs task masked_lm (model.task is {recipe.model.task})")
        if c.strategy == "random" and recipe.model.task in ("seq2seq",):
            raise RecipeError("strategy", "random token dropping supports decoder-only or encoder-only models")

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        if self.config.seed is None:
            self._seed = args.seed
        if self._steps is None and args.max_steps > 0:
            self._steps = max(1, args.max_steps - self.config.start_step)
        return args

    def on_dataset(self, dataset: Any, tokenizer: Any) -> Any:
        self.tokenizer = tokenizer
        return dataset

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        c = self.config
        importance = None
        if c.strategy == "importance":
            vocab = model.get_input_embeddings().num_embeddings
            tok = self.tokenizer
            specials = tok.all_special_ids if tok is not None else []
            pad = tok.pad_token_id if tok is not None else getattr(model.config, "pad_token_id", None)
            importance = TokenImportance(vocab, specials, pad, c.importance_init, c.importance_beta)
        self.dropper = TokenDropper(
            model, c.strategy, c.keep_start, c.full_first, c.full_last, c.multiple_of, self._seed, importance
        )
        return model

    def keep_at(self, step: int) -> float:
        steps = self._steps if self.config.schedule == "linear" else None
        return keep_fraction(step, self.config.keep_start, steps, self.config.start_step)

    def on_batch(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        if self.dropper is not None:
            self.dropper.keep = self.keep_at(step)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.dropper.state_dict() if self.dropper is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.dropper is not None and state:
            self.dropper.load_state_dict(state)

    def report(self) -> dict[str, Any]:
        if self.dropper is None:
            return {}
        return {"dropping_layers": self.dropper.layer_ids, "schedule_steps": self._steps, "seed": self._seed}
