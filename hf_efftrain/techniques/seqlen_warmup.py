"""Sequence-length warmup: train on short sequences first and grow them to full length (a length curriculum).

Li, Zhang and He, "The Stability-Efficiency Dilemma: Investigating Sequence Length Warmup for Training GPT
Models", NeurIPS 2022, arXiv 2108.06084. Long sequences early in training cause extreme gradient variance and
instability. SLW truncates every batch to a length that grows with the step ``t`` over ``T = warmup_steps``::

    f(t)   = t / T                      (linear, the paper's pacing function)
           = (t / T) ** (1 / degree)    (root, DeepSpeed's ``fixed_root`` curriculum schedule)
    raw(t) = floor(min_length + (full_length - min_length) * f(t))
    len(t) = min(full_length, max(min_length, raw(t) - raw(t) mod 8))    for t < T

The length is rounded down to a multiple of 8 for tensor cores. From ``t >= T`` on, batches pass through untouched.
``t`` is the trainer's ``global_step``, so the schedule needs no state of its own to resume: a resumed run gets the
same length at step ``k`` as an uninterrupted one.

Two ways to shorten a batch of rows of length ``L > len(t) = n``:

- truncate (default, the paper's implementation): keep the first ``n`` tokens of every row. The tokens per batch
  shrink by ``n / L``, and so does the compute of early steps. The paper counts training in tokens, so a
  truncated run sees fewer tokens per step.
- ``constant_tokens: true``: reshape, as in Composer's ``truncate=False`` and DeepSpeed's ``seqlen_reshape``. Every
  row is cut into ``ceil(L / n)`` consecutive rows of ``n`` tokens (the last one padded), so the real tokens per
  step, and the learning-rate schedule's meaning of a step, stay those of the baseline. What is lost is context
  across the cuts, and one target per cut: a row's first label is never predicted. Rows with no target left are
  dropped. Unlike Composer, a cut never spans two rows: with padded rows that would let one document attend to
  another. Each new row starts at position 0, as a truncated row does. In a packed row, its first (continued)
  document's ``position_ids`` are shifted to start at 0.

Both keep the batch consistent. Every tensor with the sequence on dim 1 (``input_ids``, ``labels``, a 2D
``attention_mask``, ``position_ids`` from packing, ...) is cut the same way. A 4D block mask is cut on its last two
dims (reshape keeps its diagonal blocks), and flash-attention's ``cu_seq_lens``/``max_length`` are recomputed
from the new ``position_ids``.

Loss scaling: the Trainer counts ``num_items_in_batch`` (the loss denominator) in ``get_batch_samples``.
EffTrainer runs ``on_batch`` inside that method, before the count. With the stock Trainer,
``SeqLenWarmup.attach(trainer)`` wraps that method on the trainer instance to the same effect. Otherwise, a
truncated batch's loss would be divided by the full batch's target count. The transform is idempotent.

Functional core: ``warmup_length(step, ...)``, ``truncate_batch``, ``reshape_batch``, and the ``SeqLenWarmup``
class (call it on a batch, or ``attach`` it to a stock ``Trainer``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field

from ..core.patching import Patch, patch_attr
from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig
from ..errors import RecipeError
from .packing import FLASH_KEYS, flash_varlen_kwargs

logger = logging.getLogger(__name__)

Schedule = Literal["linear", "root"]
MULTIPLE_OF = 8


def warmup_length(
    step: int,
    *,
    min_length: int,
    full_length: int,
    warmup_steps: int,
    schedule: Schedule = "linear",
    root_degree: float = 2.0,
    multiple_of: int = MULTIPLE_OF,
) -> int:
    """The sequence length at ``step`` (see the module docstring); ``full_length`` once ``step >= warmup_steps``."""
    if step >= warmup_steps:
        return full_length
    frac = max(step, 0) / warmup_steps
    if schedule == "root":
        frac = frac ** (1.0 / root_degree)
    elif schedule != "linear":
        raise ValueError(f"unknown schedule {schedule!r}; allowed: linear, root")
    raw = math.floor(min_length + (full_length - min_length) * frac)
    return min(full_length, max(min_length, raw - raw % multiple_of))


def _seq_len(batch: dict[str, Any]) -> int:
    return batch["input_ids"].shape[1]


def _is_block_mask(value: Any, length: int) -> bool:
    return torch.is_tensor(value) and value.dim() == 4 and value.shape[-2:] == (length, length)


def _is_sequence(value: Any, length: int) -> bool:
    return torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == length


def _with_flash_kwargs(out: dict[str, Any], had_flash: bool) -> dict[str, Any]:
    if had_flash and "position_ids" in out:
        out.update(flash_varlen_kwargs(out["position_ids"]))
    return out


def truncate_batch(batch: dict[str, Any], length: int) -> dict[str, Any]:
    """Keep the first ``length`` tokens of every row of every sequence tensor (a new dict; no-op if shorter)."""
    full = _seq_len(batch)
    if full <= length:
        return batch
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in FLASH_KEYS:
            continue
        if _is_block_mask(value, full):
            out[key] = value[..., :length, :length]
        elif _is_sequence(value, full):
            out[key] = value[:, :length]
        else:
            out[key] = value
    return _with_flash_kwargs(out, "cu_seq_lens_q" in batch)


def _pad_value(key: str, value: torch.Tensor, pad_token_id: int) -> int | float | bool:
    if key in ("labels", "shift_labels"):
        return -100
    if key == "input_ids":
        return pad_token_id
    return False if value.dtype == torch.bool else 0


def reshape_batch(batch: dict[str, Any], length: int, pad_token_id: int = 0) -> dict[str, Any]:
    """Cut every row into consecutive rows of ``length`` tokens, keeping all real tokens (module docstring)."""
    full = _seq_len(batch)
    if full <= length:
        return batch
    rows, pieces = batch["input_ids"].shape[0], -(-full // length)
    width = pieces * length
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in FLASH_KEYS:
            continue
        if _is_block_mask(value, full):
            out[key] = _diagonal_blocks(value, pieces, length)
        elif _is_sequence(value, full):
            if width > full:
                pad_shape = (value.shape[0], width - full, *value.shape[2:])
                pad = torch.full(
                    pad_shape, _pad_value(key, value, pad_token_id), dtype=value.dtype, device=value.device
                )
                if key == "position_ids":  # the padding is its own segment
                    pad = torch.arange(width - full, device=value.device).expand(pad_shape).to(value.dtype)
                value = torch.cat([value, pad], dim=1)
            out[key] = value.reshape(rows * pieces, length, *value.shape[2:])
        else:
            out[key] = value
    if "position_ids" in out:
        out["position_ids"] = _restart_positions(out["position_ids"])
    if "labels" in out:  # rows that no longer hold a target only cost compute
        keep = (out["labels"][:, 1:] != -100).any(dim=1)
        if not keep.all() and keep.any():
            index = keep.nonzero().reshape(-1)
            n = out["input_ids"].shape[0]
            out = {
                k: v.index_select(0, index) if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v
                for k, v in out.items()
            }
    return _with_flash_kwargs(out, "cu_seq_lens_q" in batch)


def _diagonal_blocks(mask: torch.Tensor, pieces: int, length: int) -> torch.Tensor:
    """[B, H, L, L] -> [B * pieces, H, n, n]: the diagonal blocks; the padded tail attends only to itself."""
    full, width = mask.shape[-1], pieces * length
    if width > full:
        blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        padded = torch.full((*mask.shape[:2], width, width), blocked, dtype=mask.dtype, device=mask.device)
        padded[..., :full, :full] = mask
        idx = torch.arange(full, width, device=mask.device)
        padded[..., idx, idx] = True if mask.dtype == torch.bool else 0  # no fully masked query row
        mask = padded
    b, h = mask.shape[:2]
    blocks = mask.reshape(b, h, pieces, length, pieces, length).diagonal(dim1=2, dim2=4)  # [B, H, n, n, pieces]
    return blocks.permute(0, 4, 1, 2, 3).reshape(b * pieces, h, length, length)


def _restart_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Shift each row's first segment (a document continued from the previous row) to start at position 0."""
    starts = position_ids == 0
    starts[:, 0] = True
    first = starts.cumsum(dim=1) == 1
    return position_ids - position_ids[:, :1] * first


class SeqLenWarmup:
    """The schedule plus the batch transform; ``attach(trainer)`` makes a stock ``Trainer`` use it (and count the
    loss denominator on shortened batches)."""

    def __init__(
        self,
        min_length: int,
        full_length: int,
        warmup_steps: int,
        schedule: Schedule = "linear",
        root_degree: float = 2.0,
        constant_tokens: bool = False,
        pad_token_id: int = 0,
    ):
        if not 1 <= min_length <= full_length or warmup_steps < 1:
            raise ValueError("need 1 <= min_length <= full_length and warmup_steps >= 1")
        self.min_length, self.full_length, self.warmup_steps = min_length, full_length, warmup_steps
        self.schedule, self.root_degree = schedule, root_degree
        self.constant_tokens = constant_tokens
        self.pad_token_id = pad_token_id
        self.targets_in = 0  # targets (shifted labels != -100) before shortening, over this run's batches
        self.targets_out = 0  # ... and after

    def length(self, step: int) -> int:
        return warmup_length(
            step,
            min_length=self.min_length,
            full_length=self.full_length,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            root_degree=self.root_degree,
        )

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        if step >= self.warmup_steps or "input_ids" not in batch:
            return batch
        n = self.length(step)
        if _seq_len(batch) <= n:
            return batch
        out = reshape_batch(batch, n, self.pad_token_id) if self.constant_tokens else truncate_batch(batch, n)
        if "labels" in batch:
            self.targets_in += int((batch["labels"][:, 1:] != -100).sum())
            self.targets_out += int((out["labels"][:, 1:] != -100).sum())
        return out

    def attach(self, trainer: Any) -> Patch:
        """Shorten each micro-batch inside ``trainer.get_batch_samples``, before ``num_items_in_batch`` is counted."""
        original = trainer.get_batch_samples

        def get_batch_samples(epoch_iterator, num_batches, device):
            step = trainer.state.global_step
            return original((self(b, step) for b in epoch_iterator), num_batches, device)

        return patch_attr(trainer, "get_batch_samples", get_batch_samples)


class SeqLenWarmupConfig(TechniqueConfig):
    name: Literal["seqlen_warmup"] = "seqlen_warmup"
    min_length: int = Field(64, ge=1, description="Sequence length at step 0 (the paper: 64 for GPT-2's 1024).")
    full_length: int | None = Field(
        None,
        ge=8,
        description="Length reached at the end of the warmup; default data.max_length (set it to the packing "
        "length when packing uses longer rows).",
    )
    warmup_steps: int = Field(..., ge=1, description="Optimizer steps over which the length grows (T).")
    schedule: Schedule = Field("linear", description="Pacing: linear (t/T) or root ((t/T)^(1/root_degree)).")
    root_degree: float = Field(2.0, gt=0, description="Degree of the root schedule (2: square root).")
    constant_tokens: bool = Field(
        False,
        description="false: truncate rows (the paper; fewer tokens per early step). true: reshape each row into "
        "more, shorter rows so real tokens per step stay constant.",
    )


@register_technique
class SeqLenWarmupTechnique(Technique):
    """Shortens training batches on a schedule of the global step (``on_batch``, and in ``get_batch_samples``)."""

    name = "seqlen_warmup"
    Config = SeqLenWarmupConfig
    survey_section = "Computation efficiency / Data selection (curriculum: sequence length warmup)"
    paper = (
        'Li, Zhang and He 2022, "The Stability-Efficiency Dilemma: Investigating Sequence Length Warmup for '
        'Training GPT Models", arXiv 2108.06084'
    )

    config: SeqLenWarmupConfig

    def __init__(self, config: SeqLenWarmupConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.warmup: SeqLenWarmup | None = None
        self.pad_token_id = 0
        self._restored: dict[str, Any] = {}

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        full = c.full_length or recipe.data.max_length
        if c.min_length >= full:
            raise RecipeError("min_length", f"must be below the full length {full} (full_length or data.max_length)")
        if recipe.model.task not in ("auto", "causal_lm", "sft"):
            raise RecipeError("", f"seqlen_warmup shortens causal LM rows (causal_lm, sft), not {recipe.model.task}")
        self._make(full)

    def _make(self, full: int) -> SeqLenWarmup:
        c = self.config
        self.warmup = SeqLenWarmup(
            c.min_length, full, c.warmup_steps, c.schedule, c.root_degree, c.constant_tokens, self.pad_token_id
        )
        self.load_state_dict(self._restored)
        return self.warmup

    def on_dataset(self, dataset: Any, tokenizer: Any) -> Any:
        if tokenizer.pad_token_id is not None:
            self.pad_token_id = tokenizer.pad_token_id
            if self.warmup is not None:
                self.warmup.pad_token_id = self.pad_token_id
        return dataset

    def _ensure(self, batch: dict[str, Any]) -> SeqLenWarmup:
        # Built in validate(); without a recipe (by hand), the first batch's length is the full length.
        return self.warmup or self._make(self.config.full_length or _seq_len(batch))

    def on_trainer(self, trainer: Any) -> None:
        # EffTrainer applies on_batch in get_batch_samples, before the loss denominator is counted, so no
        # attach() here (that is for the stock Trainer).
        if self.warmup is None and self.config.full_length:
            self._make(self.config.full_length)

    def on_batch(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        return self._ensure(batch)(batch, step)

    def state_dict(self) -> dict[str, Any]:
        w = self.warmup
        return {"targets_in": w.targets_in, "targets_out": w.targets_out} if w else dict(self._restored)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)
        if self.warmup is not None:
            self.warmup.targets_in = int(state.get("targets_in", 0))
            self.warmup.targets_out = int(state.get("targets_out", 0))

    def report(self) -> dict[str, Any]:
        w = self.warmup
        if w is None:
            return {}
        return {
            "full_length": w.full_length,
            "length_at_step_0": w.length(0),
            "mode": "reshape" if w.constant_tokens else "truncate",
            "targets_during_warmup": w.targets_in,
            "targets_dropped_fraction": 1 - w.targets_out / w.targets_in if w.targets_in else 0.0,
        }

    def compute_fraction(self, model: torch.nn.Module, steps: int, seq_len: int) -> Any:
        """Before ``warmup_steps`` rows are cut to len(t): a token attends over min(len(t), seq_len) positions, so
        attention scales by that over seq_len, averaged over the tokens (truncate: len(t) a row at step t; reshape:
        the same number at every step). Matmul work per token does not change."""
        from ..runtime.flop_count import ComputeFraction, Parts

        w = self.warmup
        if w is None or steps <= 0 or seq_len <= 0:
            return None
        lengths = [min(w.length(t), seq_len) for t in range(steps)]
        weights = [1] * steps if w.constant_tokens else lengths
        r = sum(n * k for n, k in zip(lengths, weights)) / (sum(weights) * seq_len)
        note = f"seqlen warmup: attention over {r:.4g} of seq_len {seq_len} on average (rows as long as seq_len)"
        return ComputeFraction(note, rest=Parts(attention_forward=r, attention_backward=r))
