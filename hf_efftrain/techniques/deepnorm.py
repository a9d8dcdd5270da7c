"""DeepNorm: post-LN residuals with an up-weighted skip connection and a down-scaled init, for very deep stacks.

Wang et al., "DeepNet: Scaling Transformers to 1,000 Layers", arXiv 2203.00555. Every sublayer G (attention or FFN):

    x_{l+1} = LN(alpha * x_l + G(x_l))

and at init (paper Fig. 2 pseudocode): Xavier-normal with gain beta for the FFN weights and the value and output
projections, Xavier-normal with gain 1 for q and k. Constants (paper Fig. 2 table; N encoder layers, M decoder):

    encoder-only:     alpha = (2N)^(1/4),              beta = (8N)^(-1/4)
    decoder-only:     alpha = (2M)^(1/4),              beta = (8M)^(-1/4)
    encoder-decoder:  encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16)
                      decoder alpha = (3M)^(1/4),          beta = (12M)^(-1/4)

Checked against the authors' torchscale (microsoft/torchscale, ``torchscale/architecture/encoder.py`` and
``decoder.py``): encoder alpha = 0.81 (N^4 M)^0.0625 or (2N)^0.25, init divided by (N^4 M)^0.0625 / 1.15
(1/1.15 = 0.87) or (8N)^0.25; decoder alpha (3M)^0.25 or (2M)^0.25, init divided by (12M)^0.25 or (8M)^0.25; scaled
parameters are fc1, fc2, out_proj and v_proj, including the decoder's cross-attention.

Per architecture (registered residual policies keyed by the HF block class; projections from t_fixup.py's policies):
- BERT-style post-LN encoders (BertLayer, RobertaLayer, XLMRobertaLayer, ElectraLayer): the residual input of each
  post-LN sublayer (``BertSelfOutput``/``BertOutput``: ``LN(dropout(dense(h)) + input)``) is multiplied by alpha.
- Pre-LN decoders (Llama, Mistral, Qwen2, Qwen3, GPT-2): converted to post-LN. The block's forward becomes
  ``h = norm1(alpha x + attn(x)); out = norm2(alpha h + mlp(h))`` with the block's own norms (RMSNorm for Llama), and
  the final norm of the body is removed (post-LN output is already normalized, as in DeepNet).
- T5 (pre-LN, RMS norm, encoder-decoder): each sublayer (self-attention, cross-attention, FFN) becomes
  ``LN(alpha x + dropout(f(x)))`` with its own norm, and both stacks' final norms are removed.
- BART (post-LN encoder-decoder): the layer's forward is the stock one with every residual multiplied by alpha.
- Encoder-decoder models use the paper's encoder-decoder constants (N encoder and M decoder layers).
- Other architectures get a RecipeError naming the supported ones.

All changes to the forward pass are instance patches with one undo handle; weights are not restored. The patches are
not saved with the model: re-apply ``apply_deepnorm(model, reinit=False)`` after loading a checkpoint.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..core.layers import layer_stacks
from ..core.patching import Patches, patch_attr
from ..core.registry import register_technique
from ..core.technique import ORDER_INIT, Env, Technique, TechniqueConfig, refuse_pretrained_weights
from ..errors import RecipeError
from .t_fixup.policies import (
    MODEL_PATH,
    block_policy,
    check_recipe_model,
    proj_params,
    strip_norms,
)

logger = logging.getLogger(__name__)


def deepnorm_constants(n_encoder: int = 0, n_decoder: int = 0) -> dict[str, tuple[float, float]]:
    """``{role: (alpha, beta)}`` for a model with these stack depths (0 = no such stack); paper Fig. 2."""
    n, m = n_encoder, n_decoder
    if n and m:
        return {
            "encoder": (0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)),
            "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25),
        }
    if n:
        return {"encoder": ((2 * n) ** 0.25, (8 * n) ** -0.25)}
    if m:
        return {"decoder": ((2 * m) ** 0.25, (8 * m) ** -0.25)}
    raise ValueError("a model needs at least one stack of layers")


def model_constants(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``deepnorm_constants`` for this model's encoder and decoder depths."""
    stacks = layer_stacks(model)
    return deepnorm_constants(len(stacks.get("encoder", ())), len(stacks.get("decoder", ())))


# ---- residual policies: (block, alpha) -> patches; ``converts`` = pre-LN made post-LN ----------------------------
Rewrite = Callable[[nn.Module, float], Patches]
_POLICIES: dict[str, tuple[Rewrite, bool]] = {}


def register_deepnorm_policy(block_class: str, rewrite: Rewrite, converts: bool) -> None:
    _POLICIES[block_class] = (rewrite, converts)


def supported() -> list[str]:
    return sorted(_POLICIES)


def deepnorm_policy(block: nn.Module, path: str = MODEL_PATH) -> tuple[Rewrite, bool]:
    for cls in type(block).__mro__:
        if cls.__name__ in _POLICIES:
            return _POLICIES[cls.__name__]
    raise RecipeError(
        path, f"deepnorm does not support {type(block).__name__} blocks; supported: {', '.join(supported())}"
    )


def _bert_post_ln(layer: nn.Module, alpha: float) -> Patches:
    patches = Patches()
    subs = [layer.attention.output, layer.output]
    if getattr(layer, "crossattention", None) is not None:
        subs.append(layer.crossattention.output)
    for sub in subs:  # forward(hidden_states, input_tensor) = LN(dropout(dense(hidden_states)) + input_tensor)
        original = sub.forward
        patches.add(patch_attr(sub, "forward", lambda h, input_tensor, _f=original: _f(h, alpha * input_tensor)))
    return patches


def _bind(block: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The original forward's arguments by name (its **kwargs merged in), so they can be passed on unchanged."""
    sig = inspect.signature(type(block).forward)
    bound = sig.bind(block, *args, **kwargs).arguments
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    named = {k: v for k, v in bound.items() if k not in ("self", var_kw)}
    return {**named, **(bound.get(var_kw) or {})}


def _llama_post_ln(layer: nn.Module, alpha: float) -> Patches:
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        a = _bind(layer, args, kwargs)
        x = a.pop("hidden_states")
        attn, _ = layer.self_attn(hidden_states=x, **a)  # the original passes all its arguments to self_attn
        h = layer.input_layernorm(alpha * x + attn)
        return layer.post_attention_layernorm(alpha * h + layer.mlp(h))

    return Patches([patch_attr(layer, "forward", forward)])


def _gpt2_post_ln(block: nn.Module, alpha: float) -> Patches:
    if hasattr(block, "crossattention"):
        raise RecipeError(MODEL_PATH, "deepnorm does not support GPT-2 blocks with cross-attention")

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        a = _bind(block, args, kwargs)
        x = a.pop("hidden_states")
        a.pop("encoder_hidden_states", None)
        a.pop("encoder_attention_mask", None)
        attn, _ = block.attn(x, **a)
        h = block.ln_1(alpha * x + attn)
        return block.ln_2(alpha * h + block.mlp(h))

    return Patches([patch_attr(block, "forward", forward)])


def _t5_post_ln(block: nn.Module, alpha: float) -> Patches:
    # T5LayerSelfAttention / T5LayerCrossAttention: (h, ...) -> (h + dropout(attn(norm(h))), position_bias, weights)
    def attention(sub: nn.Module, attn: nn.Module) -> Callable[..., tuple]:
        def forward(*args: Any, **kwargs: Any) -> tuple:
            a = _bind(sub, args, kwargs)
            h = a.pop("hidden_states")
            a["mask"] = a.pop("attention_mask", None)  # T5Attention's name for it
            out, *rest = attn(h, **a)
            return (sub.layer_norm(alpha * h + sub.dropout(out)), *rest)

        return forward

    patches = Patches()
    for sub in block.layer:
        if hasattr(sub, "DenseReluDense"):  # T5LayerFF: h -> h + dropout(ff(norm(h)))
            ff = lambda h, _s=sub: _s.layer_norm(alpha * h + _s.dropout(_s.DenseReluDense(h)))  # noqa: E731
            patches.add(patch_attr(sub, "forward", ff))
        else:
            attn = getattr(sub, "SelfAttention", None) or sub.EncDecAttention
            patches.add(patch_attr(sub, "forward", attention(sub, attn)))
    return patches


def _bart_post_ln(layer: nn.Module, alpha: float) -> Patches:
    """BartEncoderLayer / BartDecoderLayer's forward with each residual scaled by alpha (already post-LN)."""

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        a = _bind(layer, args, kwargs)
        x = a.pop("hidden_states")
        enc, enc_mask = a.pop("encoder_hidden_states", None), a.pop("encoder_attention_mask", None)
        a.pop("use_cache", None)

        def drop(t: torch.Tensor, p: float = layer.dropout) -> torch.Tensor:
            return nn.functional.dropout(t, p=p, training=layer.training)

        x = layer.self_attn_layer_norm(alpha * x + drop(layer.self_attn(x, **a)[0]))
        if enc is not None:
            a["attention_mask"] = enc_mask
            x = layer.encoder_attn_layer_norm(alpha * x + drop(layer.encoder_attn(x, key_value_states=enc, **a)[0]))
        h = layer.fc2(drop(layer.activation_fn(layer.fc1(x)), layer.activation_dropout))
        return layer.final_layer_norm(alpha * x + drop(h))

    return Patches([patch_attr(layer, "forward", forward)])


for _name in ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer"):
    register_deepnorm_policy(_name, _bert_post_ln, converts=False)
register_deepnorm_policy("T5Block", _t5_post_ln, converts=True)
for _name in ("BartEncoderLayer", "BartDecoderLayer"):
    register_deepnorm_policy(_name, _bart_post_ln, converts=False)
for _name in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"):
    register_deepnorm_policy(_name, _llama_post_ln, converts=True)
register_deepnorm_policy("GPT2Block", _gpt2_post_ln, converts=True)


def check_supported(model: nn.Module) -> None:
    for stack in layer_stacks(model).values():
        for block in stack:
            deepnorm_policy(block)
            block_policy(block)


@torch.no_grad()
def deepnorm_init(model: nn.Module, generator: torch.Generator | None = None) -> dict[str, tuple[float, float]]:
    """Xavier-normal with gain beta for v, o (self and cross attention) and the MLP weights, gain 1 for q and k."""
    constants = model_constants(model)
    for role, stack in layer_stacks(model).items():
        beta = constants[role][1]
        for block in stack:
            policy = block_policy(block)
            gains = [(p, 1.0) for a in policy.attention for p in (a.q, a.k)]
            gains += [(p, beta) for a in policy.attention for p in (a.v, a.o)]
            gains += [(p, beta) for p in (*policy.mlp.inputs, policy.mlp.output)]
            for proj, gain in gains:
                nn.init.xavier_normal_(proj_params(block, proj)[0], gain=gain, generator=generator)
    return constants


def apply_deepnorm(model: nn.Module, *, reinit: bool = True, generator: torch.Generator | None = None) -> Patches:
    """DeepNorm in place: init (unless ``reinit=False``), alpha-scaled post-LN residuals; returns the undo handle."""
    check_supported(model)
    constants = model_constants(model)
    if reinit:
        deepnorm_init(model, generator)
    patches, converted = Patches(), False
    for role, stack in layer_stacks(model).items():
        for block in stack:
            rewrite, converts = deepnorm_policy(block)
            patches.items.extend(rewrite(block, constants[role][0]).items)
            converted |= converts
    if converted:
        patches.items.extend(strip_norms(model, blocks=False).items)
    return patches


class DeepnormConfig(TechniqueConfig):
    name: Literal["deepnorm"] = "deepnorm"
    reinit: bool = Field(
        True, description="Apply the DeepNet init (Xavier-normal, gain beta on v/o/FFN); false keeps the weights."
    )


@register_technique
class DeepnormTechnique(Technique):
    """Applies DeepNorm in ``on_model``."""

    name = "deepnorm"
    Config = DeepnormConfig
    survey_section = "Computation efficiency / Initialization"
    paper = 'Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", arXiv 2203.00555'
    conflicts = frozenset({"t_fixup", "fixup"})
    order = ORDER_INIT

    config: DeepnormConfig

    def validate(self, recipe: Any, env: Env) -> None:
        if self.config.reinit:  # reinit: false keeps the weights (DeepNorm's residual scaling alone)
            refuse_pretrained_weights(recipe, self.name, keep=" (or set reinit: false to keep the weights)")
        check_recipe_model(recipe, check_supported)

    def on_model(self, model: nn.Module) -> nn.Module:
        self.constants = model_constants(model)
        self.patches = apply_deepnorm(model, reinit=self.config.reinit)
        logger.info("deepnorm: (alpha, beta) per stack %s", self.constants)
        return model

    def report(self) -> dict[str, Any]:
        return {"alpha_beta": {r: list(ab) for r, ab in getattr(self, "constants", {}).items()}}
