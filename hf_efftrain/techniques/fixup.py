"""Fixup: train deep residual networks without normalization, adapted to Transformer blocks.

Zhang, Dauphin, Ma, "Fixup Initialization: Residual Learning Without Normalization", ICLR 2019, arXiv 1901.09321.
The paper's rules (Sec. 3), for a network of L residual branches with m weight layers each:

1. Initialize the last layer of every residual branch (and the classification layer) to 0.
2. Initialize the other layers with a standard method and scale the weight layers inside residual branches by
   L^(-1/(2m-2)).
3. Add a scalar multiplier (init 1) in every branch and a scalar bias (init 0) before each linear/conv layer and
   each activation.

Adaptation to Transformer blocks (the paper's own Transformer experiments do not spell out a per-layer recipe):
- A branch is one attention sublayer (self or cross) or one MLP sublayer; L counts all of them in the model (2 per
  encoder/decoder-only layer, 3 per decoder layer with cross-attention).
- Attention branch: the signal path through it is v -> o, so m = 2; o is zeroed and v scaled by L^(-1/2). q and k only
  shape the attention weights and keep the model's init.
- MLP branch: up -> down is m = 2 (scale L^(-1/2)); a gated MLP (act(gate x) * up x) is a product of three weight
  layers, m = 3, so gate and up are scaled by L^(-1/4). down is zeroed.
- Rule 3: the branch output module becomes ``ScaledOutput``: ``gain * o(x + b_in) + b_out`` (gain 1, biases 0), and
  every branch input projection (q, k, v or a fused qkv; up/gate) becomes ``InputBias``: ``proj(x + b)``. The scalar
  bias before the activation is left out (the projections of GPT-2/BERT/T5-style MLPs carry their own bias or none).
- The head is not zeroed: tied input/output embeddings would zero the embeddings too.
- Norms are removed by default (``remove_norms``). With them removed every block is exactly the identity at
  initialization, which is the point of Fixup.

Functional core: ``apply_fixup(model)`` returns an undo handle that unwraps the modules and restores the norms
(weight changes stay). Uses the block policies of t_fixup.py (one per HF block class).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..core.patching import Patches
from ..core.registry import register_technique
from ..core.technique import ORDER_INIT, Env, Technique, TechniqueConfig, refuse_pretrained_weights
from .t_fixup.policies import (
    blocks_with_policies,
    check_recipe_model,
    get_module,
    proj_params,
    strip_norms,
    swap_module,
)

logger = logging.getLogger(__name__)


def _scalar(module: nn.Module, value: float) -> nn.Parameter:
    ref = next(module.parameters())
    return nn.Parameter(torch.full((1,), value, dtype=ref.dtype, device=ref.device))  # 1-d: ZeRO-3 friendly


class ScaledOutput(nn.Module):
    """The end of a Fixup branch: ``gain * inner(x + bias_in) + bias_out`` with learnable scalars."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.bias_in = _scalar(inner, 0.0)
        self.gain = _scalar(inner, 1.0)
        self.bias_out = _scalar(inner, 0.0)

    @property
    def weight(self) -> torch.Tensor:  # model code that reads e.g. ``wo.weight.dtype`` keeps working
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.inner(x + self.bias_in) + self.bias_out


class InputBias(nn.Module):
    """Fixup's scalar bias before a linear layer: ``inner(x + bias)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.bias = _scalar(inner, 0.0)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + self.bias)


def fixup_scale(n_branches: int, m: int) -> float:
    """L^(-1/(2m-2)) for the weight layers inside a branch of m layers."""
    return n_branches ** (-1.0 / (2 * m - 2))


@torch.no_grad()
def apply_fixup(model: nn.Module, *, remove_norms: bool = True) -> Patches:
    """Fixup in place; returns the undo handle of the wrappers (and of the norm removal)."""
    blocks = blocks_with_policies(model)
    n_branches = sum(len(policy.attention) + 1 for *_, policy in blocks)
    patches = Patches()
    for _, _, block, policy in blocks:
        branches = [((a.v,), (a.q, a.k, a.v), a.o, 2) for a in policy.attention]
        mlp = policy.mlp
        branches.append((mlp.inputs, mlp.inputs, mlp.output, 3 if mlp.gated else 2))
        for scaled, _, output, m in branches:  # weights first: the wrappers below change the module paths
            for proj in scaled:
                proj_params(block, proj)[0].mul_(fixup_scale(n_branches, m))
            out = get_module(block, output.path)
            out.weight.zero_()
            if getattr(out, "bias", None) is not None:
                out.bias.zero_()
        for _, inputs, output, _ in branches:
            patches.add(swap_module(block, output.path, ScaledOutput(get_module(block, output.path))))
            for path in dict.fromkeys(p.path for p in inputs):  # a fused qkv gets one bias
                patches.add(swap_module(block, path, InputBias(get_module(block, path))))
    if remove_norms:
        patches.items.extend(strip_norms(model).items)
    return patches


class FixupConfig(TechniqueConfig):
    name: Literal["fixup"] = "fixup"
    remove_norms: bool = Field(
        True, description="Replace the body's LayerNorm/RMSNorm modules by identity (Fixup trains without them)."
    )


@register_technique
class FixupTechnique(Technique):
    """Applies Fixup in ``on_model``: zero branch outputs, scaled inner weights, scalar gains and biases."""

    name = "fixup"
    Config = FixupConfig
    survey_section = "Computation efficiency / Initialization"
    paper = 'Zhang et al. 2019, "Fixup Initialization: Residual Learning Without Normalization", arXiv 1901.09321'
    conflicts = frozenset({"t_fixup", "deepnorm"})
    order = ORDER_INIT

    config: FixupConfig

    def validate(self, recipe: Any, env: Env) -> None:
        refuse_pretrained_weights(recipe, self.name)
        check_recipe_model(recipe, blocks_with_policies)

    def on_model(self, model: nn.Module) -> nn.Module:
        self.n_branches = sum(len(p.attention) + 1 for *_, p in blocks_with_policies(model))
        self.patches = apply_fixup(model, remove_norms=self.config.remove_norms)
        logger.info("fixup: %d residual branches", self.n_branches)
        return model

    def report(self) -> dict[str, Any]:
        n = getattr(self, "n_branches", 0)
        return {"residual_branches": n, "scale_m2": fixup_scale(n, 2) if n else None}
