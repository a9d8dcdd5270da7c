"""T-Fixup: an initialization that trains Transformers without learning-rate warmup and without LayerNorm.

Huang, Perez, Ba, Volkovs, "Improving Transformer Optimization Through Better Initialization", ICML 2020
(proceedings.mlr.press/v119/huang20f; code github.com/layer6ai-labs/T-Fixup). Algorithm 1 of the paper:

1. Xavier initialization for all parameters except the input embeddings, which get Gaussian N(0, d^-1/2) (std
   d^-1/2, d = embedding dim).
2. Decoder (N layers): scale the value v and output w projections of every attention block (self and cross) and
   the weight matrices of every MLP block by (9N)^-1/4; scale the input embeddings x (encoder) and y (decoder) by
   (9N)^-1/4.
3. Encoder (N layers): scale v, w and the MLP weight matrices by 0.67 N^-1/4.
4. Remove LayerNorm and train without warmup.

Checked against the reference implementation (layer6ai-labs/T-Fixup @ cce506a):
- ``fairseq/modules/transformer_layer.py``, ``fixup_initialization``: encoder ``fc1``, ``fc2``, ``self_attn.out_proj``
  weights x 0.67 N_enc^-1/4 and ``v_proj`` x 0.67 N_enc^-1/4 * sqrt(2); decoder ``fc1``, ``fc2``, ``self_attn`` and
  ``encoder_attn`` ``out_proj`` x (9 N_dec)^-1/4, both ``v_proj`` x (9 N_dec)^-1/4 * sqrt(2). The sqrt(2) only undoes
  fairseq's own ``xavier_uniform_(v_proj, gain=1/sqrt(2))`` (``multihead_attention.py``), so v ends at plain Xavier x
  the factor, as here. Biases are not scaled (only ``.weight`` is).
- ``fairseq/models/transformer.py``: embeddings N(0, std d^-1/2) with the padding row zeroed; the *encoder*
  embedding is scaled by (9 N_enc)^-1/4 (not 0.67 N^-1/4) and the decoder's by (9 N_dec)^-1/4, skipped when all
  embeddings are shared (one tensor, scaled once with the encoder's N). Tied output embeddings are scaled with them
  (their IWSLT example uses ``--share-decoder-input-output-embed``); an untied output head keeps its own init.

HF adaptations (documented, not in the paper): learned position and token-type embeddings count as input embeddings
(same Gaussian and scale; fairseq used sinusoidal positions). fairseq multiplies embeddings by sqrt(d) in the forward
pass, most HF models do not, and we keep each model's forward as is: hidden states start small, and a decoder without
a head norm starts with near-uniform logits and a slow first few steps. T5 has no 1/sqrt(d_head) logit scale, so its
query gets it folded into the Xavier init (as T5's own init does). Fused projections (GPT-2 ``c_attn``, Phi-3
``qkv_proj``/``gate_up_proj``) are initialised per logical part and only the value part gets the v-scale; GPT-2's
Conv1D stores weights transposed. Removed norms are swapped for ``nn.Identity`` with an undo handle; weight changes are
not undone. A checkpoint saved after norm removal reloads *with* fresh norms: call ``strip_norms`` again after loading.

Per-architecture code is a block policy keyed by the HF block class (``t_fixup/policies.py``,
``register_block_policy``), found through the stacks of ``hf_efftrain.core.layers.layer_stacks``; fixup.py and
deepnorm.py use the same policies.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import TrainingArguments

from ...core.layers import layer_stacks
from ...core.patching import Patches
from ...core.registry import register_technique
from ...core.technique import ORDER_INIT, Env, Technique, TechniqueConfig, refuse_pretrained_weights
from ...errors import RecipeError
from .policies import (  # noqa: F401  (re-exported: the policy API lives with the technique that introduced it)
    MODEL_PATH,
    Attn,
    BlockPolicy,
    Mlp,
    Proj,
    all_projections,
    block_policy,
    blocks_with_policies,
    check_recipe_model,
    input_embeddings,
    proj_params,
    register_block_policy,
    strip_norms,
    supported_blocks,
)

logger = logging.getLogger(__name__)


def t_fixup_factor(role: str, n_layers: int) -> float:
    """Scale of v, o and MLP weights: 0.67 N^-1/4 in an encoder, (9N)^-1/4 in a decoder."""
    return 0.67 * n_layers**-0.25 if role == "encoder" else (9 * n_layers) ** -0.25


def embedding_factor(n_layers: int) -> float:
    """Scale of the input embeddings of a stack with N layers, encoder or decoder: (9N)^-1/4."""
    return (9 * n_layers) ** -0.25


@torch.no_grad()
def t_fixup_init(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Step 1: Xavier-uniform for every block projection (each fused part on its own), zero biases; N(0, d^-1/2) for
    the input embeddings with the padding row zeroed."""
    for _, _, block, policy in blocks_with_policies(model):
        for proj in all_projections(policy):
            weight, bias = proj_params(block, proj)
            nn.init.xavier_uniform_(weight, generator=generator)
            if bias is not None:
                bias.zero_()
        for a in policy.attention:
            if a.q_gain != 1.0:
                proj_params(block, a.q)[0].mul_(a.q_gain)
    for _, _, emb in input_embeddings(model):
        emb.weight.normal_(0.0, emb.embedding_dim**-0.5, generator=generator)
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()


def t_fixup_facts(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per stack: its depth and the factors T-Fixup uses for it."""
    return {
        role: {
            "layers": len(s),
            "block_factor": t_fixup_factor(role, len(s)),
            "embedding_factor": embedding_factor(len(s)),
        }
        for role, s in layer_stacks(model).items()
    }


@torch.no_grad()
def t_fixup_scale(model: nn.Module) -> None:
    """Steps 2-3: scale v, o (self and cross attention) and MLP weights per stack, and the input embeddings."""
    for role, n, block, policy in blocks_with_policies(model):
        factor = t_fixup_factor(role, n)
        for proj in [p for a in policy.attention for p in (a.v, a.o)] + [*policy.mlp.inputs, policy.mlp.output]:
            proj_params(block, proj)[0].mul_(factor)
    depth = {role: len(stack) for role, stack in layer_stacks(model).items()}
    for role, _, emb in input_embeddings(model):
        emb.weight.mul_(embedding_factor(depth[role]))


def apply_t_fixup(
    model: nn.Module, *, reinit: bool = True, remove_norms: bool = True, generator: torch.Generator | None = None
) -> Patches:
    """T-Fixup in place. Returns the undo handle of the norm removal (the weight changes stay)."""
    blocks_with_policies(model)  # unsupported architecture: fail before touching anything
    if reinit:
        t_fixup_init(model, generator)
    t_fixup_scale(model)
    return strip_norms(model) if remove_norms else Patches()


class TFixupConfig(TechniqueConfig):
    name: Literal["t_fixup"] = "t_fixup"
    reinit: bool = Field(
        True,
        description="Re-initialise first (Xavier; Gaussian std d^-1/2 embeddings); false scales the model's init.",
    )
    remove_norms: bool = Field(
        True, description="Replace the body's LayerNorm/RMSNorm modules by identity (the paper trains without them)."
    )
    disable_warmup: bool = Field(
        True, description="Set training warmup_steps to 0 (T-Fixup removes the need for warmup)."
    )


@register_technique
class TFixupTechnique(Technique):
    """Applies T-Fixup in ``on_model`` and turns warmup off."""

    name = "t_fixup"
    Config = TFixupConfig
    survey_section = "Computation efficiency / Initialization"
    paper = (
        'Huang et al. 2020, "Improving Transformer Optimization Through Better Initialization", ICML 2020, '
        "PMLR v119 (huang20f)"
    )
    conflicts = frozenset({"fixup", "deepnorm"})
    order = ORDER_INIT

    config: TFixupConfig

    def validate(self, recipe: Any, env: Env) -> None:
        warmup = (getattr(recipe, "training", None) or {}).get("warmup_steps", 0) or 0
        if self.config.disable_warmup and warmup > 0:
            raise RecipeError(
                "disable_warmup", f"true conflicts with training.warmup_steps={warmup}; drop one of them"
            )
        refuse_pretrained_weights(recipe, self.name)
        check_recipe_model(recipe, blocks_with_policies)

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        if self.config.disable_warmup:
            args.warmup_steps = 0
        return args

    def on_model(self, model: nn.Module) -> nn.Module:
        self.patches = apply_t_fixup(model, reinit=self.config.reinit, remove_norms=self.config.remove_norms)
        self.facts = t_fixup_facts(model)
        logger.info("t_fixup: %s; %d norms removed", self.facts, len(self.patches.items))
        return model

    def report(self) -> dict[str, Any]:
        facts = getattr(self, "facts", {})
        return {"stacks": facts, "norms_removed": len(getattr(self, "patches", Patches()).items)}
