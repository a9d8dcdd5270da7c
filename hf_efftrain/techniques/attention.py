"""Choose the attention kernel through Transformers' public ``attn_implementation`` switch.

IO-aware exact attention: Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", NeurIPS 2022, arXiv 2205.14135 (survey Sec. "Hardware/algorithm co-design", efficient attention).
``sdpa`` dispatches to PyTorch's fused kernels (FlashAttention / memory-efficient attention where the hardware
allows), ``flash_attention_2/3/4`` to the flash-attn packages (CUDA only), ``flex_attention`` to
``torch.nn.attention.flex_attention``, ``eager`` to the plain matmul-softmax reference.

Functional core: ``attention_kwargs(implementation)``, i.e. ``from_pretrained(..., attn_implementation=...)``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..errors import MissingDependencyError, RecipeError
from ..registry import register_technique
from ..technique import Env, Technique, TechniqueConfig

Implementation = Literal[
    "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"
]

# Import name of the package each flash implementation loads (transformers.modeling_flash_attention_utils).
FLASH_PACKAGES = {
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn_interface",
    "flash_attention_4": "flash_attn",
}


def attention_kwargs(implementation: str) -> dict[str, Any]:
    """Model-loading kwargs that select ``implementation``."""
    return {"attn_implementation": implementation}


class AttentionConfig(TechniqueConfig):
    name: Literal["attention"] = "attention"
    implementation: Implementation = Field(
        "sdpa",
        description="Attention kernel: sdpa (PyTorch fused, default), eager (reference), flash_attention_2/3/4 "
        "(flash-attn package, CUDA), flex_attention (torch flex_attention).",
    )


@register_technique
class AttentionTechnique(Technique):
    """Sets ``attn_implementation`` when the model is built."""

    name = "attention"
    Config = AttentionConfig
    survey_section = "Hardware/algorithm co-design / Efficient attention"
    paper = (
        'Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", '
        "arXiv 2205.14135"
    )

    config: AttentionConfig

    @classmethod
    def status(cls) -> str:
        import torch

        from ..technique import has_package

        if torch.cuda.is_available() and any(has_package(p) for p in FLASH_PACKAGES.values()):
            return "ready"
        return "ready (flash_*: needs CUDA and flash-attn)"

    def validate(self, recipe: Any, env: Env) -> None:
        impl = self.config.implementation
        model_impl = getattr(getattr(recipe, "model", None), "attn_implementation", None)
        if model_impl is not None and model_impl != impl:
            raise RecipeError(
                "implementation",
                f"{impl!r} conflicts with model.attn_implementation={model_impl!r}; set only one of them",
            )
        if impl in FLASH_PACKAGES:
            if not env.cuda:
                raise RecipeError(
                    "implementation",
                    f"{impl} runs FlashAttention CUDA kernels and needs a CUDA GPU; use 'sdpa' on this machine",
                )
            if FLASH_PACKAGES[impl] not in env.installed:
                raise MissingDependencyError("implementation", FLASH_PACKAGES[impl], "flash")
        if impl == "flex_attention" and not env.cuda:
            raise RecipeError("implementation", "flex_attention has no backward pass on CPU; use 'sdpa' or a GPU")

    def model_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.update(attention_kwargs(self.config.implementation))
        return kwargs
