"""The token dropper: patches the middle layers of a model to run on the kept tokens only, plus the kept count and
its schedule (random-LTD, Yao et al. 2022, arXiv 2211.11586; importance-based, Hou et al. 2022, arXiv 2203.13240).

``random``: every dropping layer draws, independently of the other layers, a random sorted index set I_l
(|I_l| = K for every row of the batch). ``importance``: one index set per forward pass, the K most important
positions (``importance.py``), shared by all middle layers. Each dropping layer then runs on its index set
(``subset.py``).

Kept count: K = keep * S rounded to a multiple of ``multiple_of`` (at least 1, at most S); keep follows a linear
schedule from ``keep_start`` to 1.0 over ``schedule_steps`` steps from ``start_step`` (keep_start before that).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from ...core.layers import base_model, layer_stacks
from ...core.patching import Patches, patch_attr
from ...errors import RecipeError
from .importance import TokenImportance
from .subset import _POLICIES, ArgMap, DropPolicy, Selection, row_offsets, subset_call


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


class TokenDropper:
    """Patches the middle layers of ``model`` (by ``layer_stacks`` and a registered ``DropPolicy``).

    ``keep`` (set it each step) is the kept fraction; ``undo()`` restores the model. ``last_indices[i]`` holds the
    kept indices of layer i's last training forward (for inspection and tests). Under ``torch.compile`` the kept
    count and the draw run outside the graph (``_selection``: one graph break per dropping layer), so a changing
    ``keep`` is a changing K, which dynamo's automatic dynamic shapes absorb after one recompile.
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
            raise RecipeError("strategy", "importance needs a masked-LM encoder (e.g. BertForMaskedLM)")
        layers = next(iter(stacks.values()))
        n = len(layers)
        first = full_first if full_first is not None else (1 if strategy == "random" else n // 2)
        self.layer_ids = list(range(first, n - full_last))
        if not self.layer_ids:
            raise RecipeError(
                "full_first",
                f"no layer left to drop tokens in: {n} layers, full_first={first}, full_last={full_last}",
            )
        self.strategy, self.keep, self.multiple_of = strategy, keep, multiple_of
        self.importance = importance
        self.generator = torch.Generator().manual_seed(seed)
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._row_starts: dict[tuple, torch.Tensor] = {}
        self.config = getattr(model, "config", None)
        self.last_indices: dict[int, torch.Tensor] = {}
        self._shared: Selection | None = None  # importance: this forward's kept tokens
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
        argmap = ArgMap(inspect.signature(type(layer).forward.__get__(layer)))  # the class's own parameter names

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not layer.training:
                return original(*args, **kwargs)
            sel = self._selection(i, argmap.get(args, kwargs, policy.hidden))
            if sel is None:
                return original(*args, **kwargs)
            return subset_call(original, argmap, policy, sel, args, kwargs, self._flash())

        return forward

    def _flash(self) -> bool:
        """Whether the attention kernel reads position ids (flash attention: packed segments from their restarts)."""
        return "flash" in str(getattr(self.config, "_attn_implementation", None) or "")

    @torch.compiler.disable  # RNG, the kept count and the host-side draw stay out of compiled graphs (one break)
    def _selection(self, i: int, hidden: torch.Tensor) -> Selection | None:
        b, s = hidden.shape[:2]
        k = kept_count(s, self.keep, self.multiple_of) if self.keep < 1.0 else s
        if k >= s:
            return None
        if self.strategy == "importance":
            sel = self._shared
        else:
            sel = Selection.of(self._draw(b, s, k, hidden.device), s, self._offsets(b, s, hidden.device))
        if sel is not None:
            self.last_indices[i] = sel.idx
        return sel

    def _offsets(self, b: int, s: int, device: torch.device) -> torch.Tensor:
        """The rows' starts in the flattened view, made once per batch shape (two device ops fewer per layer)."""
        key = (b, s, device)
        if key not in self._row_starts:
            self._row_starts = {key: row_offsets(b, s, device)}  # one shape at a time: no growth with shapes
        return self._row_starts[key]

    def _draw(self, b: int, s: int, k: int, device: torch.device) -> torch.Tensor:
        # One seed from the CPU generator (its state is what resume restores); the draw itself runs on the hidden
        # states' device, so no host-device copy stalls the GPU at every layer. One device generator, reseeded.
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        g = self._device_generators.get(device)
        if g is None:
            g = self._device_generators[device] = torch.Generator(device=device)
        keys = torch.rand(b, s, generator=g.manual_seed(seed), device=device)
        return keys.argsort(dim=1)[:, :k].sort(dim=1).values

    @torch.compiler.disable
    def _select(self, module, args, kwargs):
        self._shared = None
        if not module.training or self.keep >= 1.0:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("token_dropping strategy 'importance' needs input_ids (not inputs_embeds)")
        s = ids.shape[1]
        k = kept_count(s, self.keep, self.multiple_of)
        if k < s:
            kept = self.importance.select(ids, k, kwargs.get("attention_mask"))
            self._shared = Selection.of(kept, s, self._offsets(ids.shape[0], s, ids.device))
        return None

    @torch.compiler.disable  # boolean indexing and bincount: data-dependent shapes, bookkeeping under no_grad
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
