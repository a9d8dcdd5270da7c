"""bf16 mixed precision: compute in bfloat16 under autocast, keep fp32 master weights and optimizer state.

Micikevicius et al., "Mixed Precision Training", ICLR 2018, arXiv 1710.03740 (survey Sec. "Memory efficiency /
Quantized training"). bfloat16 has fp32's exponent range, so unlike fp16 it needs no loss scaling; it runs on
Ampere+ GPUs and, through CPU autocast, on CPUs.

Alias of ``mixed_precision`` with ``dtype: bf16`` (mixed_precision.py is the one implementation, and the
canonical way to write it; ``training.bf16`` is refused in a recipe). Functional core:
``amp_training_args(args, "bf16")``, i.e. ``TrainingArguments(bf16=True)``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..core.registry import register_technique
from ..core.technique import TechniqueConfig
from .mixed_precision import ONLY_IF_NATIVE, MixedPrecisionConfig, MixedPrecisionTechnique


class Bf16Config(TechniqueConfig):
    name: Literal["bf16"] = "bf16"
    full_eval: bool = Field(False, description="Also evaluate with the whole model cast to bf16 (bf16_full_eval).")
    only_if_native: bool = Field(False, description=ONLY_IF_NATIVE)


@register_technique
class Bf16Technique(MixedPrecisionTechnique):
    """Alias of ``mixed_precision`` with ``dtype: bf16``: sets ``TrainingArguments.bf16`` (and ``mixed_precision``)."""

    name = "bf16"
    Config = Bf16Config
    survey_section = "Memory efficiency / Quantized training (alias of mixed_precision dtype: bf16)"
    paper = 'Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740'
    conflicts = frozenset({"fp16", "mixed_precision"})
    dtype_field = "name"

    config: Bf16Config

    def resolve(self) -> MixedPrecisionConfig:
        fields = self.config.model_dump(include={"full_eval", "only_if_native"}, exclude_unset=True)
        return MixedPrecisionConfig(dtype="bf16", **fields)
