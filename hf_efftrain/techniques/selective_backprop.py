"""Selective backprop: online importance sampling that backpropagates only the examples with the biggest losses.

Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers", arXiv 1910.00762. For every
training micro-batch of B examples:

1. forward all B without gradients and take each example's loss ``L_i``: the mean token cross-entropy over its
   labels != -100 (after the model's own shift for causal LM / SFT; no shift for seq2seq and masked LM), the
   cross-entropy of its label for classification (squared error for regression, mean BCE for multi-label);
2. append ``L_1..L_B`` to the history ``R`` of the last ``history_size`` losses;
3. ``P_i = max(sampling_min, CDF_R(L_i) ** beta)`` where ``CDF_R(L)`` is the percentile rank of ``L`` in ``R``
   (scipy's ``percentileofscore(kind="rank") / 100``, as in the authors' code):
   ``(#{r < L} + #{r <= L} + [#{r <= L} > #{r < L}]) / (2 |R|)``;
4. keep example i with probability ``P_i`` (seeded Bernoulli draws); when none is kept, keep the largest loss;
5. forward + backward only the kept subset, so the backward pass (about 2/3 of a step) shrinks to the kept share.

For stationary losses the CDF values are uniform on [0, 1], so the expected kept fraction is ``E[U^beta] =
1 / (1 + beta)`` (beta 1: 1/2, 2: 1/3, 3: 1/4); ``sampling_min`` raises it.

The returned loss is a proper mean over the kept examples' target tokens. The Trainer normalises a causal-LM
loss by ``num_items_in_batch`` (the label tokens of the whole accumulated step, on all processes) and then treats
it as already scaled for gradient accumulation; we scale that count by this micro-batch's kept share of tokens,
``n_kept / n_all``. With one micro-batch per step this gives exactly ``sum(CE over kept tokens) / n_kept``; with
several it gives the mean of the micro-batches' kept-token means. Without ``num_items_in_batch`` the model's own
mean over the subset is used and the Trainer divides by the accumulation steps as usual.

Several processes (DDP): every process selects from the losses of all processes' micro-batches (gathered in rank
order), with one history and one generator, as a single process would from the global batch; each then
backpropagates its own kept share (at least one example, its largest loss, so every process runs a backward). The
selection state is therefore the same on every process, and the checkpoint that process 0 writes resumes them all
exactly.

Functional core: ``SelectiveBackprop`` (``probabilities``, ``select``, ``loss``); with the stock Trainer,
``handle = SelectiveBackprop(beta=1).install(trainer)`` wraps ``trainer.compute_loss`` (``handle.undo()`` removes).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..core.layers import unwrap_model
from ..core.patching import Patch, route_training_loss
from ..core.registry import register_technique
from ..core.technique import Technique, TechniqueConfig

logger = logging.getLogger(__name__)


def loss_shifts_labels(model: torch.nn.Module) -> bool:
    """True when the model's loss predicts ``labels[t + 1]`` from position t (decoder-only LM heads)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    m = unwrap_model(model)
    if getattr(getattr(m, "config", None), "is_encoder_decoder", False):
        return False
    # GPT-2 style `*LMHeadModel` classes have no loss_type but are registered as causal LMs.
    return (
        LOSS_MAPPING.get(getattr(m, "loss_type", None)) is ForCausalLMLoss
        or type(m).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def per_example_loss(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool, shift_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, targets)`` per example: mean token CE over labels != -100 (sequence) or the per-example loss of a
    classification / regression head; ``targets`` counts the tokens (1 per example for classification)."""
    if logits.dim() == 2:  # sequence classification head: (B, C)
        if labels.dim() == 1 and not labels.is_floating_point():
            loss = F.cross_entropy(logits.float(), labels, reduction="none")
        elif logits.shape[-1] == 1:
            loss = (logits.float().squeeze(-1) - labels.float().view(-1)) ** 2
        else:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(-1)
        return loss, torch.ones_like(loss)
    if shift_labels is not None:
        labels = shift_labels
    elif shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.reshape(b * t, v).float(), labels.reshape(-1), ignore_index=-100, reduction="none")
    valid = (labels != -100).float()
    targets = valid.sum(1)
    return (ce.view(b, t) * valid).sum(1) / targets.clamp(min=1), targets


def percentile_rank(history: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """scipy ``percentileofscore(history, L, kind="rank") / 100`` for each L, vectorised."""
    lt = (history[None, :] < losses[:, None]).sum(1).double()
    le = (history[None, :] <= losses[:, None]).sum(1).double()
    return (lt + le + (le > lt).double()) / (2 * history.numel())


def gather_across_processes(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every process's ``x`` concatenated along dim 0 in rank order (sizes may differ), and each process's size.
    One process (or no process group): ``x`` itself."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, [x.shape[0]]
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(c) for c in sizes]
    width = max(counts)
    padded = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts


class SelectiveBackprop:
    """Selection state (loss history, RNG, counters) plus the loss computation on the kept subset."""

    def __init__(self, beta: float = 1.0, history_size: int = 1024, sampling_min: float = 0.0, seed: int = 0):
        if beta < 0 or history_size < 1 or not 0 <= sampling_min <= 1:
            raise ValueError("need beta >= 0, history_size >= 1, 0 <= sampling_min <= 1")
        self.beta, self.sampling_min = beta, sampling_min
        self.history: deque[float] = deque(maxlen=history_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_keep: torch.Tensor | None = None  # the latest micro-batch's mask (for inspection)
        self.counts = {"examples_seen": 0, "examples_backpropagated": 0, "tokens_seen": 0, "tokens_backpropagated": 0}

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def probabilities(self, losses: torch.Tensor) -> torch.Tensor:
        """Append ``losses`` to the history, then ``P_i = max(sampling_min, CDF_R(L_i) ** beta)``."""
        losses = losses.detach().double().cpu()
        self.history.extend(losses.tolist())
        cdf = percentile_rank(torch.tensor(list(self.history), dtype=torch.float64), losses)
        return cdf.pow(self.beta).clamp(min=self.sampling_min)

    def select(self, losses: torch.Tensor) -> torch.Tensor:
        """Boolean mask of kept examples (at least one: the largest loss)."""
        probs = self.probabilities(losses)
        keep = torch.rand(probs.shape, generator=self.generator, dtype=torch.float64) < probs
        if not keep.any():
            keep[int(torch.argmax(losses.detach().cpu()))] = True
        return keep

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        compute_loss: Any,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | None:
        """The loss of the kept subset (None when the batch has no labels or no targets: default path)."""
        labels = batch.get("labels")
        if not torch.is_tensor(labels) or labels.numel() == 0:
            return None
        if num_items_in_batch is None:  # EffTrainer passes the Trainer's count inside a functools.partial
            num_items_in_batch = getattr(compute_loss, "keywords", {}).get("num_items_in_batch")
        size = labels.shape[0]
        with torch.no_grad():
            logits = model(**batch).logits
            losses, targets = per_example_loss(logits, labels, loss_shifts_labels(model), batch.get("shift_labels"))
            del logits
        # all processes' (loss, targets), in rank order: one selection, so the state is the same everywhere
        gathered, sizes = gather_across_processes(torch.stack([losses.double(), targets.double()], dim=1))
        gathered = gathered.cpu()
        all_losses, all_targets = gathered[:, 0], gathered[:, 1]
        all_valid = all_targets > 0  # examples without a target token carry no loss: never kept, not in the history
        if not all_valid.any():
            return None
        keep_all = torch.zeros(len(gathered), dtype=torch.bool)
        keep_all[all_valid] = self.select(all_losses[all_valid])
        start = 0
        for n in sizes:  # each process backpropagates at least its largest loss (DDP needs every backward)
            part = slice(start, start + n)
            if all_valid[part].any() and not keep_all[part].any():
                keep_all[start + int(torch.argmax(all_losses[part].masked_fill(~all_valid[part], -torch.inf)))] = True
            start += n
        self.counts["examples_seen"] += int(all_valid.sum())
        self.counts["examples_backpropagated"] += int(keep_all.sum())
        self.counts["tokens_seen"] += int(all_targets.sum())
        self.counts["tokens_backpropagated"] += int(all_targets[keep_all].sum())
        rank = torch.distributed.get_rank() if len(sizes) > 1 else 0
        offset = sum(sizes[:rank])
        keep = keep_all[offset : offset + size]
        if not (targets > 0).any():  # this process has nothing to learn from: the default loss (as before)
            return None
        self.last_keep = keep
        keep = keep.to(labels.device)
        idx = keep.nonzero().squeeze(1)
        subset = {
            k: v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size else v for k, v in batch.items()
        }
        n_all, n_kept = targets.sum(), targets[keep].sum()
        if num_items_in_batch is None:
            return compute_loss(model, subset)
        scaled = num_items_in_batch * (n_kept / n_all).to(getattr(num_items_in_batch, "device", n_kept.device))
        return compute_loss(model, subset, num_items_in_batch=scaled)

    def install(self, trainer: Any) -> Patch:
        """Route a stock ``transformers.Trainer``'s training loss through ``loss``; returns the undo handle."""
        return route_training_loss(trainer, self.loss)

    def fraction_backpropagated(self) -> float | None:
        seen = self.counts["examples_seen"]
        return self.counts["examples_backpropagated"] / seen if seen else None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "generator": self.generator.get_state(), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(float(x) for x in state["history"])
        self.generator.set_state(state["generator"])
        self.counts.update(state["counts"])


class SelectiveBackpropConfig(TechniqueConfig):
    name: Literal["selective_backprop"] = "selective_backprop"
    beta: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Selectivity: P = CDF(loss)^beta; expected kept fraction 1/(1+beta) (paper uses 1-3).",
    )
    history_size: int = Field(1024, ge=1, le=1_000_000, description="Recent per-example losses the CDF is taken over.")
    sampling_min: float = Field(0.0, ge=0, le=1, description="Floor on each example's keep probability.")
    start_step: int = Field(
        0, ge=0, description="Optimizer steps trained on every example before selection starts (warm-up)."
    )
    seed: int | None = Field(None, description="Seed of the selection draws; default training.seed.")


@register_technique
class SelectiveBackpropTechnique(Technique):
    """Replaces the training loss with the loss of the selected subset, through the ``loss`` hook."""

    name = "selective_backprop"
    Config = SelectiveBackpropConfig
    survey_section = "Data efficiency / Importance sampling"
    paper = 'Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers", arXiv 1910.00762'

    config: SelectiveBackpropConfig

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        c = self.config
        self.seed = c.seed if c.seed is not None else 42
        self.core = SelectiveBackprop(c.beta, c.history_size, c.sampling_min, self.seed)
        self.trainer: Any = None

    def validate(self, recipe: Any, env: Any) -> None:
        if self.config.seed is None:
            self.seed = int(recipe.training.get("seed", 42))
            self.core.reseed(self.seed)

    def on_trainer(self, trainer: Any) -> None:
        self.trainer = trainer
        self.core.reseed(self.seed)  # one generator, in step on every process (each selects for all of them)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], compute_loss: Any) -> torch.Tensor | None:
        step = self.trainer.state.global_step if self.trainer is not None else self.config.start_step
        if step < self.config.start_step:
            return None
        return self.core.loss(model, batch, compute_loss)

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state)

    def report(self) -> dict[str, Any]:
        c = self.core.counts
        tokens = c["tokens_backpropagated"] / c["tokens_seen"] if c["tokens_seen"] else None
        return {
            **c,
            "fraction_backpropagated": self.core.fraction_backpropagated(),
            "token_fraction_backpropagated": tokens,
            "expected_fraction_stationary": 1 / (1 + self.config.beta),
            "history_len": len(self.core.history),
        }

    def compute_fraction(self, model: torch.nn.Module, steps: int, seq_len: int) -> Any:
        """From ``start_step`` on, every micro-batch runs a no-grad forward of all examples, then forward and backward
        of the kept share f (``token_fraction_backpropagated``): forward 1 + f, backward f of the counted work."""
        from ..runtime.flop_count import ComputeFraction, Parts

        c = self.core.counts
        f = c["tokens_backpropagated"] / c["tokens_seen"] if c["tokens_seen"] else self.core.fraction_backpropagated()
        if f is None or steps <= 0:
            return None
        a = max(0, steps - self.config.start_step) / steps  # the share of steps that selected
        forward, backward = 1 + a * f, 1 - a + a * f
        note = (f"selective backprop: {f:.4g} of the target tokens backpropagated in {a:.4g} of the steps, after "
                "a no-grad forward of all of them")  # fmt: skip
        return ComputeFraction(note, rest=Parts(forward, backward, backward, forward, backward))


__all__ = ["SelectiveBackprop", "SelectiveBackpropConfig", "SelectiveBackpropTechnique", "per_example_loss"]
