"""Large-batch training: a target global batch through gradient accumulation, with learning-rate and warmup rules.

The survey (Zhuang et al. 2023, arXiv 2302.01107, Sec. 3.1, "large batch training") pairs larger batches with
LAMB / Lion and with rules that keep training stable when the batch grows. With ``B`` the target global batch,
``B_ref`` the ``reference_batch_size`` at which the recipe's learning rate ``lr_ref`` was tuned and ``k = B / B_ref``:

    gradient_accumulation_steps = B / (per_device_train_batch_size * world_size)    (must divide exactly)
    lr_scaling linear:  lr = lr_ref * k          Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training
                                                 ImageNet in 1 Hour", arXiv 1706.02677, Sec. 2.1
    lr_scaling sqrt:    lr = lr_ref * sqrt(k)    Krizhevsky 2014, arXiv 1404.5997; the rule You et al. 2020 use
                                                 with LAMB (arXiv 1904.00962, Sec. 4)
    warmup same_samples: warmup_steps = round(W * B_ref / B)   Goyal et al. (Sec. 2.2, gradual warmup over a fixed
                                                 number of epochs): warmup covers the same number of samples as the
                                                 recipe's W steps did at B_ref
    warmup same_steps:  warmup_steps = W         linear-epoch warmup (You et al. 2018, "Large-Batch Training for
                                                 LSTM and Beyond", arXiv 1901.08256): warmup epochs grow with k, so
                                                 the step count stays the same; the recipe's warmup is left as is

``max_steps`` keeps counting optimizer steps, each of ``B`` samples.

Order: ``ORDER_DEFAULT + 100``, after the optimizer techniques (``lion``, ``lamb``, ``optimizer``), whose
``training_args`` hooks may set ``args.learning_rate``. So ``lr_ref`` is the learning rate the run would use at
``B_ref`` (the recipe's, or the optimizer technique's override, e.g. Lion's ``lr`` or its ``from_adamw``
conversion) and this technique scales it; an optimizer technique never overwrites the scaled value.

Functional core: ``large_batch_settings(...)`` returns what to set; ``apply_large_batch(args, ...)`` sets it on a
``TrainingArguments`` for the stock Trainer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field
from transformers import TrainingArguments

from ..core.registry import register_technique
from ..core.technique import ORDER_DEFAULT, Env, Technique, TechniqueConfig
from ..errors import RecipeError

logger = logging.getLogger(__name__)

LrScaling = Literal["none", "linear", "sqrt"]
Warmup = Literal["same_steps", "same_samples"]


@dataclass(frozen=True)
class LargeBatchSettings:
    batch_size: int
    per_device_train_batch_size: int
    world_size: int
    gradient_accumulation_steps: int
    lr_scaling: str
    reference_batch_size: int | None
    reference_learning_rate: float
    learning_rate: float
    warmup: str
    reference_warmup_steps: float
    warmup_steps: float


def large_batch_settings(
    batch_size: int,
    per_device_train_batch_size: int,
    world_size: int,
    learning_rate: float,
    warmup_steps: float = 0,
    lr_scaling: LrScaling = "none",
    reference_batch_size: int | None = None,
    warmup: Warmup = "same_steps",
) -> LargeBatchSettings:
    """Accumulation steps, learning rate and warmup steps for a global batch of ``batch_size`` (module docstring).
    Raises RecipeError (field paths of the technique's config) when the numbers do not fit."""
    per_step = per_device_train_batch_size * world_size
    if batch_size % per_step:
        lower, upper = batch_size // per_step * per_step, (batch_size // per_step + 1) * per_step
        raise RecipeError(
            "batch_size",
            f"{batch_size} is not a multiple of per_device_train_batch_size x world_size = "
            f"{per_device_train_batch_size} x {world_size} = {per_step}; use e.g. "
            + (f"{lower} or {upper}" if lower else f"{upper}"),
        )
    needs_reference = lr_scaling != "none" or warmup == "same_samples"
    if needs_reference and reference_batch_size is None:
        raise RecipeError("reference_batch_size", "needed by lr_scaling linear/sqrt and warmup same_samples")
    k = batch_size / reference_batch_size if reference_batch_size else 1.0
    lr = {"none": learning_rate, "linear": learning_rate * k, "sqrt": learning_rate * math.sqrt(k)}[lr_scaling]
    new_warmup = warmup_steps
    if warmup == "same_samples" and warmup_steps:
        if warmup_steps < 1:
            raise RecipeError(
                "warmup",
                f"same_samples rescales a warmup step count, but training.warmup_steps={warmup_steps} is a ratio "
                "of the run (already independent of the batch); use warmup: same_steps or give steps",
            )
        new_warmup = max(1, round(warmup_steps / k))
    return LargeBatchSettings(
        batch_size=batch_size,
        per_device_train_batch_size=per_device_train_batch_size,
        world_size=world_size,
        gradient_accumulation_steps=batch_size // per_step,
        lr_scaling=lr_scaling,
        reference_batch_size=reference_batch_size,
        reference_learning_rate=learning_rate,
        learning_rate=lr,
        warmup=warmup,
        reference_warmup_steps=warmup_steps,
        warmup_steps=new_warmup,
    )


def apply_large_batch(
    args: TrainingArguments,
    batch_size: int,
    lr_scaling: LrScaling = "none",
    reference_batch_size: int | None = None,
    warmup: Warmup = "same_steps",
) -> LargeBatchSettings:
    """Set gradient_accumulation_steps, learning_rate and warmup_steps on ``args`` (plain fields, set in place)."""
    s = large_batch_settings(
        batch_size,
        args.per_device_train_batch_size,
        args.world_size,
        args.learning_rate,
        args.warmup_steps,
        lr_scaling,
        reference_batch_size,
        warmup,
    )
    args.gradient_accumulation_steps = s.gradient_accumulation_steps
    args.learning_rate = s.learning_rate
    args.warmup_steps = s.warmup_steps
    logger.info(
        "large_batch: global batch %d = %d per device x %d processes x %d accumulation steps; lr %g -> %g; "
        "warmup steps %g -> %g",
        s.batch_size, s.per_device_train_batch_size, s.world_size, s.gradient_accumulation_steps,
        s.reference_learning_rate, s.learning_rate, s.reference_warmup_steps, s.warmup_steps,
    )  # fmt: skip
    return s


class LargeBatchConfig(TechniqueConfig):
    name: Literal["large_batch"] = "large_batch"
    batch_size: int = Field(
        ge=1, description="Target global batch (samples per optimizer step), reached by gradient accumulation."
    )
    lr_scaling: LrScaling = Field(
        "none", description="none, linear (Goyal et al. 2017) or sqrt (You et al. 2020): lr x k or x sqrt(k)."
    )
    reference_batch_size: int | None = Field(
        None, ge=1, description="Batch the learning rate (and warmup_steps) were tuned at; k = batch_size / this."
    )
    warmup: Warmup = Field(
        "same_steps",
        description="same_steps: keep training.warmup_steps (linear-epoch warmup); same_samples: warmup_steps x "
        "reference_batch_size / batch_size (Goyal et al.: warmup over a fixed amount of data).",
    )


@register_technique
class LargeBatchTechnique(Technique):
    """Sets gradient accumulation, learning rate and warmup for a target global batch; see the module docstring."""

    name = "large_batch"
    Config = LargeBatchConfig
    survey_section = "Computation efficiency / Optimization (large batch training)"
    paper = (
        'Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", arXiv 1706.02677; '
        'You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", arXiv 1904.00962'
    )
    order = ORDER_DEFAULT + 100  # after optimizer techniques that set the learning rate: we scale theirs

    config: LargeBatchConfig
    _settings: LargeBatchSettings | None = None

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        training = recipe.training
        if training.get("auto_find_batch_size"):
            raise RecipeError(
                "batch_size", "training.auto_find_batch_size changes the per-device batch and so the global batch"
            )
        if c.reference_batch_size is not None and c.lr_scaling == "none" and c.warmup == "same_steps":
            raise RecipeError("reference_batch_size", "only used by lr_scaling linear/sqrt or warmup same_samples")
        settings = large_batch_settings(
            c.batch_size,
            int(training.get("per_device_train_batch_size", 8)),
            env.world_size,
            float(training.get("learning_rate", 5e-5)),
            float(training.get("warmup_steps", 0)),
            c.lr_scaling,
            c.reference_batch_size,
            c.warmup,
        )
        given = training.get("gradient_accumulation_steps")
        if given is not None and given != settings.gradient_accumulation_steps:
            raise RecipeError(
                "batch_size",
                f"training.gradient_accumulation_steps={given} contradicts batch_size {c.batch_size} "
                f"(which needs {settings.gradient_accumulation_steps}); remove it from training",
            )

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        c = self.config
        self._settings = apply_large_batch(args, c.batch_size, c.lr_scaling, c.reference_batch_size, c.warmup)
        return args

    def report(self) -> dict[str, Any]:
        return asdict(self._settings) if self._settings is not None else {}
