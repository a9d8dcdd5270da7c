"""fp16 mixed precision: compute in float16 under autocast with dynamic loss scaling, fp32 master weights.

Micikevicius et al., "Mixed Precision Training", ICLR 2018, arXiv 1710.03740 (survey Sec. "Memory efficiency /
Quantized training"): fp32 master copy of the weights, fp16 forward/backward, loss scaling so that small
gradients survive fp16's narrow exponent range. Needs a CUDA GPU (on a CPU, Accelerate would silently run neither
the autocast nor the scaler); prefer ``bf16`` where it is supported.

Alias of ``mixed_precision`` with ``dtype: fp16`` (mixed_precision.py is the one implementation, and the
canonical way to write it; ``training.fp16`` is refused in a recipe). Functional core:
``amp_training_args(args, "fp16")``, i.e. ``TrainingArguments(fp16=True)``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..core.registry import register_technique
from ..core.technique import TechniqueConfig
from .mixed_precision import MixedPrecisionConfig, MixedPrecisionTechnique


class Fp16Config(TechniqueConfig):
    name: Literal["fp16"] = "fp16"
    full_eval: bool = Field(False, description="Also evaluate with the whole model cast to fp16 (fp16_full_eval).")


@register_technique
class Fp16Technique(MixedPrecisionTechnique):
    """Alias of ``mixed_precision`` with ``dtype: fp16``: sets ``TrainingArguments.fp16``; Accelerate adds the
    GradScaler."""

    name = "fp16"
    Config = Fp16Config
    survey_section = "Memory efficiency / Quantized training (alias of mixed_precision dtype: fp16)"
    paper = 'Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740'
    conflicts = frozenset({"bf16", "mixed_precision"})
    dtype_field = "name"

    config: Fp16Config

    @classmethod
    def status(cls) -> str:
        import torch

        return "ready" if torch.cuda.is_available() else "needs CUDA"

    def resolve(self) -> MixedPrecisionConfig:
        return MixedPrecisionConfig(dtype="fp16", full_eval=self.config.full_eval)
