"""fp16 mixed precision: compute in float16 under autocast with dynamic loss scaling, fp32 master weights.

Micikevicius et al., "Mixed Precision Training", ICLR 2018, arXiv 1710.03740 (survey Sec. "Memory efficiency /
Quantized training"): fp32 master copy of the weights, fp16 forward/backward, loss scaling so that small
gradients survive fp16's narrow exponent range. Needs a CUDA GPU; prefer ``bf16`` where it is supported.

Functional core: ``TrainingArguments(fp16=True)``; Accelerate applies autocast and the GradScaler.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field
from transformers import TrainingArguments

from ..errors import RecipeError
from ..registry import register_technique
from ..technique import Env, Technique, TechniqueConfig


class Fp16Config(TechniqueConfig):
    name: Literal["fp16"] = "fp16"
    full_eval: bool = Field(False, description="Also evaluate with the whole model cast to fp16 (fp16_full_eval).")


@register_technique
class Fp16Technique(Technique):
    """Sets ``TrainingArguments.fp16`` (and ``mixed_precision``, which the Trainer hands to Accelerate)."""

    name = "fp16"
    Config = Fp16Config
    survey_section = "Memory efficiency / Quantized training"
    paper = 'Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740'
    conflicts = frozenset({"bf16"})

    config: Fp16Config

    @classmethod
    def status(cls) -> str:
        import torch

        return "ready" if torch.cuda.is_available() else "needs CUDA"

    def validate(self, recipe: Any, env: Env) -> None:
        if not env.cuda:
            raise RecipeError("name", "fp16 mixed precision needs a CUDA GPU; use bf16 on CPU")

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        if args.bf16:
            raise RecipeError("name", "training.bf16 is also set; remove it (bf16 and fp16 are exclusive)")
        # replace() reruns __post_init__, which derives mixed_precision from fp16 (setting fp16 alone does not).
        return dataclasses.replace(args, fp16=True, fp16_full_eval=self.config.full_eval or args.fp16_full_eval)
