"""bf16 mixed precision: compute in bfloat16 under autocast, keep fp32 master weights and optimizer state.

Micikevicius et al., "Mixed Precision Training", ICLR 2018, arXiv 1710.03740 (survey Sec. "Memory efficiency /
Quantized training"). bfloat16 has fp32's exponent range, so unlike fp16 it needs no loss scaling; it runs on
Ampere+ GPUs and, through CPU autocast, on CPUs.

Functional core: ``TrainingArguments(bf16=True)``; Accelerate applies the autocast.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from pydantic import Field
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from ..errors import RecipeError
from ..registry import register_technique
from ..technique import Env, Technique, TechniqueConfig

logger = logging.getLogger(__name__)


class Bf16Config(TechniqueConfig):
    name: Literal["bf16"] = "bf16"
    full_eval: bool = Field(False, description="Also evaluate with the whole model cast to bf16 (bf16_full_eval).")


@register_technique
class Bf16Technique(Technique):
    """Sets ``TrainingArguments.bf16`` (and ``mixed_precision``, which the Trainer hands to Accelerate)."""

    name = "bf16"
    Config = Bf16Config
    survey_section = "Memory efficiency / Quantized training"
    paper = 'Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740'
    conflicts = frozenset({"fp16"})

    config: Bf16Config

    def validate(self, recipe: Any, env: Env) -> None:
        if env.cuda and not env.bf16_supported:
            raise RecipeError("name", "this GPU has no bf16 support (needs Ampere, compute capability 8.0+); use fp16")

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        if args.fp16:
            raise RecipeError("name", "training.fp16 is also set; remove it (bf16 and fp16 are exclusive)")
        changes: dict[str, Any] = {"bf16": True, "bf16_full_eval": self.config.full_eval or args.bf16_full_eval}
        if not args.use_cpu and not is_torch_bf16_gpu_available():
            # No bf16-capable accelerator: TrainingArguments only allows bf16 as CPU autocast, with use_cpu.
            logger.info("bf16: no bf16-capable accelerator, training on the CPU with CPU autocast")
            changes["use_cpu"] = True
        # replace() reruns __post_init__, which derives mixed_precision from bf16 (setting bf16 alone does not).
        return dataclasses.replace(args, **changes)
