"""``attention``: an alias of the recipe field ``model.attn_implementation``, Transformers' own switch.

IO-aware exact attention: Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", NeurIPS 2022, arXiv 2205.14135 (survey Sec. "Hardware/algorithm co-design", efficient attention).
``sdpa`` dispatches to PyTorch's fused kernels (FlashAttention / memory-efficient attention where the hardware
allows), ``flash_attention_2/3/4`` to the flash-attn packages (CUDA only), ``flex_attention`` to
``torch.nn.attention.flex_attention``, ``eager`` to the plain matmul-softmax reference.

The one place of truth is ``model.attn_implementation`` (``from_pretrained(attn_implementation=...)``), which accepts
every name the installed transformers does (``AttentionInterface`` registrations, ``paged|...``, hub kernels
``org/repo``). ``{name: attention, implementation: X}`` is written there when the recipe is parsed; the two may
both be given only when they agree. The checks live with the field (core/recipe_checks.py).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ..core.recipe_checks import FLASH_PACKAGES, attn_implementation_problem
from ..core.registry import register_technique
from ..core.technique import Technique, TechniqueConfig, has_package


class AttentionConfig(TechniqueConfig):
    name: Literal["attention"] = "attention"
    implementation: str = Field(
        "sdpa",
        description="Written to model.attn_implementation: sdpa (default), eager, flash_attention_2/3/4, "
        "flex_attention, any transformers.AttentionInterface name, or a hub kernel org/repo.",
    )
    model_alias: ClassVar[dict[str, str]] = {"implementation": "attn_implementation"}

    @field_validator("implementation")
    @classmethod
    def _known(cls, value: str) -> str:
        problem = attn_implementation_problem(value)
        if problem:
            raise ValueError(problem)
        return value


@register_technique
class AttentionTechnique(Technique):
    """Alias of ``model.attn_implementation``: no hooks of its own, the recipe parser moves its value there."""

    name = "attention"
    Config = AttentionConfig
    survey_section = "Hardware/algorithm co-design / Efficient attention (alias of model.attn_implementation)"
    paper = (
        'Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", '
        "arXiv 2205.14135"
    )

    config: AttentionConfig

    @classmethod
    def status(cls) -> str:
        import torch

        if torch.cuda.is_available() and any(has_package(p) for p in FLASH_PACKAGES.values()):
            return "ready"
        return "ready (flash_*: needs CUDA and flash-attn)"
