"""Per-architecture block policies shared by the initialization techniques (t_fixup, fixup, deepnorm).

A ``BlockPolicy`` says where a transformer block keeps its attention projections (q, k, v, o; self and cross), its MLP
projections and its residual-stream norms; it is registered under the HF block class (``register_block_policy``) and
found for every block of the stacks that ``hf_efftrain.core.layers.layer_stacks`` returns. Fused projections (GPT-2
``c_attn``, Phi-3 ``qkv_proj``/``gate_up_proj``) are addressed per logical part; GPT-2's Conv1D weights are read
transposed, so every projection is seen as an (out, in) matrix. Also here: the reversible module swap the techniques
use (through ``patch_attr``), norm removal, input-embedding discovery, and an early architecture check on a
meta-device model for ``validate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...core.layers import base_model, layer_stacks
from ...core.patching import Patch, Patches, patch_attr
from ...errors import RecipeError

MODEL_PATH = "model.name_or_path"


# ---- per-architecture block policies -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proj:
    """A projection in a block: the Linear/Conv1D at ``path``, or part ``part`` of a fused one whose output splits into
    ``sizes(block)``."""

    path: str
    part: int | None = None
    sizes: Callable[[nn.Module], tuple[int, ...]] | None = None


@dataclass(frozen=True)
class Attn:
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    q_gain: float = 1.0  # extra factor on q at re-init (T5 has no 1/sqrt(d_head) in its logits)


@dataclass(frozen=True)
class Mlp:
    inputs: tuple[Proj, ...]  # up (and gate)
    output: Proj  # down
    gated: bool = False


@dataclass(frozen=True)
class BlockPolicy:
    attention: tuple[Attn, ...]  # self-attention, then cross-attention where the block has one
    mlp: Mlp
    norms: tuple[str, ...]  # the block's residual-stream norms (not QK-norms)


PolicyLike = BlockPolicy | Callable[[nn.Module], BlockPolicy]
_BLOCK_POLICIES: dict[str, PolicyLike] = {}


def register_block_policy(block_class: str, policy: PolicyLike) -> None:
    """A policy, or a function of the block instance returning one (T5 blocks differ in encoder and decoder)."""
    _BLOCK_POLICIES[block_class] = policy


def supported_blocks() -> list[str]:
    return sorted(_BLOCK_POLICIES)


def block_policy(block: nn.Module, path: str = MODEL_PATH) -> BlockPolicy:
    for cls in type(block).__mro__:
        if cls.__name__ in _BLOCK_POLICIES:
            policy = _BLOCK_POLICIES[cls.__name__]
            return policy if isinstance(policy, BlockPolicy) else policy(block)
    raise RecipeError(
        path, f"{type(block).__name__} blocks are not supported; supported: {', '.join(supported_blocks())}"
    )


def _attn(prefix: str, q: str, k: str, v: str, o: str, q_gain: float = 1.0) -> Attn:
    return Attn(Proj(f"{prefix}.{q}"), Proj(f"{prefix}.{k}"), Proj(f"{prefix}.{v}"), Proj(f"{prefix}.{o}"), q_gain)


def _gpt2(block: nn.Module) -> BlockPolicy:
    def fused(path: str, n: int) -> Callable[[int], Proj]:
        return lambda i: Proj(path, i, lambda b: (b.attn.embed_dim,) * n)

    qkv = fused("attn.c_attn", 3)
    attention = [Attn(qkv(0), qkv(1), qkv(2), Proj("attn.c_proj"))]
    norms = ["ln_1", "ln_2"]
    if hasattr(block, "crossattention"):
        kv = fused("crossattention.c_attn", 2)
        attention.append(Attn(Proj("crossattention.q_attn"), kv(0), kv(1), Proj("crossattention.c_proj")))
        norms.append("ln_cross_attn")
    return BlockPolicy(tuple(attention), Mlp((Proj("mlp.c_fc"),), Proj("mlp.c_proj")), tuple(norms))


_LLAMA = BlockPolicy(
    (_attn("self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),),
    Mlp((Proj("mlp.gate_proj"), Proj("mlp.up_proj")), Proj("mlp.down_proj"), gated=True),
    ("input_layernorm", "post_attention_layernorm"),
)


def _phi3_qkv(block: nn.Module) -> tuple[int, ...]:
    a = block.self_attn
    return (a.config.num_attention_heads * a.head_dim,) + (a.num_key_value_heads * a.head_dim,) * 2


def _phi3_gate_up(block: nn.Module) -> tuple[int, ...]:
    return (block.mlp.gate_up_proj.out_features // 2,) * 2


_PHI3 = BlockPolicy(
    (Attn(*(Proj("self_attn.qkv_proj", i, _phi3_qkv) for i in range(3)), Proj("self_attn.o_proj")),),
    Mlp(tuple(Proj("mlp.gate_up_proj", i, _phi3_gate_up) for i in range(2)), Proj("mlp.down_proj"), gated=True),
    ("input_layernorm", "post_attention_layernorm"),
)


def _bert(block: nn.Module) -> BlockPolicy:
    attention = [_attn("attention", "self.query", "self.key", "self.value", "output.dense")]
    norms = ["attention.output.LayerNorm"]
    if getattr(block, "crossattention", None) is not None:
        attention.append(_attn("crossattention", "self.query", "self.key", "self.value", "output.dense"))
        norms.append("crossattention.output.LayerNorm")
    norms.append("output.LayerNorm")
    return BlockPolicy(tuple(attention), Mlp((Proj("intermediate.dense"),), Proj("output.dense")), tuple(norms))


def _t5(block: nn.Module) -> BlockPolicy:
    q_gain = block.layer[0].SelfAttention.key_value_proj_dim ** -0.5
    attention = [_attn("layer.0.SelfAttention", "q", "k", "v", "o", q_gain)]
    if block.is_decoder:
        attention.append(_attn("layer.1.EncDecAttention", "q", "k", "v", "o", q_gain))
    ff = f"layer.{len(block.layer) - 1}.DenseReluDense"
    gated = hasattr(block.layer[-1].DenseReluDense, "wi_0")
    inputs = (Proj(f"{ff}.wi_0"), Proj(f"{ff}.wi_1")) if gated else (Proj(f"{ff}.wi"),)
    norms = tuple(f"layer.{i}.layer_norm" for i in range(len(block.layer)))
    return BlockPolicy(tuple(attention), Mlp(inputs, Proj(f"{ff}.wo"), gated), norms)


def _bart(block: nn.Module) -> BlockPolicy:
    attention = [_attn("self_attn", "q_proj", "k_proj", "v_proj", "out_proj")]
    norms = ["self_attn_layer_norm"]
    if hasattr(block, "encoder_attn"):
        attention.append(_attn("encoder_attn", "q_proj", "k_proj", "v_proj", "out_proj"))
        norms.append("encoder_attn_layer_norm")
    norms.append("final_layer_norm")
    return BlockPolicy(tuple(attention), Mlp((Proj("fc1"),), Proj("fc2")), tuple(norms))


for _name in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"):
    register_block_policy(_name, _LLAMA)
register_block_policy("Phi3DecoderLayer", _PHI3)
register_block_policy("GPT2Block", _gpt2)
for _name in ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer"):
    register_block_policy(_name, _bert)
register_block_policy("T5Block", _t5)
for _name in ("BartEncoderLayer", "BartDecoderLayer"):
    register_block_policy(_name, _bart)


# ---- shared helpers (also used by fixup.py and deepnorm.py) --------------------------------------------------------
def get_module(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split(".") if dotted else []:
        root = getattr(root, part)
    return root


def swap_module(root: nn.Module, dotted: str, new: nn.Module) -> Patch:
    """Replace the submodule at ``dotted``; ``undo()`` puts the original module back."""
    parent_path, _, name = dotted.rpartition(".")
    return patch_attr(get_module(root, parent_path), name, new)


def proj_params(block: nn.Module, proj: Proj) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Views of the projection's weight as (out, in) and of its bias; in-place ops on them (under no_grad) write
    through to the parameters."""
    module = get_module(block, proj.path)
    weight = module.weight.T if isinstance(module, Conv1D) else module.weight
    bias = getattr(module, "bias", None)
    if proj.part is not None:
        sizes = proj.sizes(block)
        start = sum(sizes[: proj.part])
        rows = slice(start, start + sizes[proj.part])
        weight, bias = weight[rows], (bias[rows] if bias is not None else None)
    return weight, bias


def all_projections(policy: BlockPolicy) -> Iterator[Proj]:
    for a in policy.attention:
        yield from (a.q, a.k, a.v, a.o)
    yield from policy.mlp.inputs
    yield policy.mlp.output


def blocks_with_policies(model: nn.Module) -> list[tuple[str, int, nn.Module, BlockPolicy]]:
    """(role, stack depth, block, policy) for every block; raises before anything is changed if one is unsupported."""
    return [
        (role, len(stack), block, block_policy(block))
        for role, stack in layer_stacks(model).items()
        for block in stack
    ]


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def outside_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of the body that are not inside a block (embeddings, embedding/final norms)."""
    inside = {id(m) for stack in layer_stacks(model).values() for m in stack.modules()}
    for name, module in base_model(model).named_modules():
        if name and id(module) not in inside:
            yield name, module


def strip_norms(model: nn.Module, blocks: bool = True, outer: bool = True) -> Patches:
    """Swap the residual-stream norms for identity: the blocks' (per policy) and the body's embedding/final norms.
    Task-head norms (e.g. BERT's MLM transform) stay."""
    patches = Patches()
    if blocks:
        for _, _, block, policy in blocks_with_policies(model):
            for path in policy.norms:
                if not isinstance(get_module(block, path), nn.Identity):
                    patches.add(swap_module(block, path, nn.Identity()))
    if outer:
        body = base_model(model)
        for name, module in list(outside_blocks(model)):
            if is_norm(module):
                patches.add(swap_module(body, name, nn.Identity()))
    return patches


def input_embeddings(model: nn.Module) -> list[tuple[str, str, nn.Embedding]]:
    """(role, name, embedding) for the body's input embeddings (tokens, learned positions, token types). A table
    shared by encoder and decoder is listed once, under the encoder (as the reference scales it)."""
    roles = list(layer_stacks(model))
    found, seen = [], set()
    for name, module in outside_blocks(model):
        if isinstance(module, nn.Embedding) and id(module.weight) not in seen:  # tied tables are listed once
            seen.add(id(module.weight))
            head = name.split(".")[0]
            role = roles[0] if len(roles) == 1 else head if head in roles else "encoder"
            found.append((role, name, module))
    return found


# ---- early architecture check (used by validate) ----------------------------------------------------------------
def meta_model(recipe: Any) -> nn.Module | None:
    """The recipe's base model built on the meta device (no memory, no download), or None if its config is not
    available offline. Lets ``validate`` reject an unsupported architecture before anything is built."""
    from transformers import AutoConfig, AutoModel

    from ...builtins import builtin_config, get_tokenizer, is_builtin

    name = getattr(getattr(recipe, "model", None), "name_or_path", None)
    try:
        if name and is_builtin(name):
            config = builtin_config(name, get_tokenizer())
        elif name and Path(name).is_dir():
            config = AutoConfig.from_pretrained(name)
        else:
            return None
        for key, value in recipe.model.config_overrides.items():
            setattr(config, key, value)
        with torch.device("meta"):
            return AutoModel.from_config(config)
    except Exception:  # the real build reports config problems with their own field paths
        return None


def check_recipe_model(recipe: Any, check: Callable[[nn.Module], Any]) -> None:
    """Run ``check`` on the recipe's model (built on the meta device) and report a failure against the technique."""
    model = meta_model(recipe)
    if model is None:
        return
    try:
        check(model)
    except RecipeError as e:
        raise RecipeError("", f"{e.message} (model.name_or_path={recipe.model.name_or_path})") from None
