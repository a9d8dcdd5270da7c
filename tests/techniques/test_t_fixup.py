"""T-Fixup (Huang et al. 2020): the scale factors against Algorithm 1 / the reference code on each architecture,
exactly (same generator, init-only vs full apply), the Xavier/Gaussian init itself, norm removal and undo, the
unsupported-architecture error, and training through a recipe with EffTrainer."""

from __future__ import annotations

import copy
import math

import pydantic
import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_efftrain import Recipe, RecipeError
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.layers import layer_stacks
from hf_efftrain.core.registry import get_technique
from hf_efftrain.techniques.t_fixup import (
    TFixupConfig,
    TFixupTechnique,
    apply_t_fixup,
    block_policy,
    embedding_factor,
    input_embeddings,
    proj_params,
    t_fixup_factor,
    t_fixup_init,
)

D = 32
SMALL = {"vocab_size": 96, "pad_token_id": 0}


def _llama(n=3):
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=n,
            num_attention_heads=4,
            num_key_value_heads=2,
            **SMALL,
        )
    )


def _gpt2(n=3):
    return GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=n, n_head=4, n_positions=32, **SMALL))


def _bert(n=4):
    return BertForMaskedLM(
        BertConfig(
            hidden_size=D,
            num_hidden_layers=n,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            **SMALL,
        )
    )


def _t5():  # encoder and decoder of different depths, so their factors differ
    return T5ForConditionalGeneration(
        T5Config(
            d_model=D,
            d_kv=8,
            d_ff=64,
            num_layers=3,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            **SMALL,
        )
    )


def _bart():
    return BartForConditionalGeneration(
        BartConfig(
            d_model=D,
            encoder_layers=1,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=32,
            **SMALL,
        )
    )


def _phi3():
    return Phi3ForCausalLM(
        Phi3Config(
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **SMALL,
        )
    )


def test_factors_by_hand():
    # encoder: 0.67 N^-1/4; decoder and every input embedding: (9N)^-1/4
    assert t_fixup_factor("encoder", 4) == pytest.approx(0.67 / math.sqrt(2))  # 0.4738
    assert t_fixup_factor("encoder", 16) == pytest.approx(0.335)
    assert t_fixup_factor("decoder", 4) == pytest.approx(1 / math.sqrt(6))  # (36)^-1/4 = 0.4082
    assert t_fixup_factor("decoder", 16) == pytest.approx(1 / math.sqrt(12))  # (144)^-1/4
    assert embedding_factor(4) == pytest.approx(1 / math.sqrt(6))


def _applied(make, seed=0):
    """(full T-Fixup, init-only) on identical copies, drawing the same random numbers."""
    torch.manual_seed(seed)
    full = make()
    init_only = copy.deepcopy(full)
    apply_t_fixup(full, generator=torch.Generator().manual_seed(1))
    t_fixup_init(init_only, generator=torch.Generator().manual_seed(1))
    return full, init_only


def _pairs(full, init_only):
    """(role, depth, policy, block_full, block_init) over all blocks."""
    stacks_f, stacks_i = layer_stacks(full), layer_stacks(init_only)
    for role in stacks_f:
        for bf, bi in zip(stacks_f[role], stacks_i[role]):
            yield role, len(stacks_f[role]), block_policy(bi), bf, bi


@pytest.mark.parametrize("make", [_llama, _gpt2, _bert, _t5, _bart, _phi3], ids=lambda f: f.__name__[1:])
def test_scales_on_every_architecture(make):
    full, init_only = _applied(make)
    seen_roles = set()
    for role, n, policy, bf, bi in _pairs(full, init_only):
        seen_roles.add(role)
        factor = 0.67 * n**-0.25 if role == "encoder" else (9 * n) ** -0.25
        scaled = [p for a in policy.attention for p in (a.v, a.o)] + [*policy.mlp.inputs, policy.mlp.output]
        for proj in scaled:  # v, o (self and cross attention), MLP: factor x the Xavier draw
            torch.testing.assert_close(proj_params(bf, proj)[0], factor * proj_params(bi, proj)[0], rtol=1e-6, atol=0)
        for a in policy.attention:  # q and k: the Xavier draw, unscaled
            for proj in (a.q, a.k):
                assert torch.equal(proj_params(bf, proj)[0], proj_params(bi, proj)[0])
        for path in policy.norms:
            assert isinstance(bf.get_submodule(path), nn.Identity)
    assert seen_roles == set(layer_stacks(full))
    depth = {role: len(s) for role, s in layer_stacks(full).items()}
    for (role, _, emb_f), (_, _, emb_i) in zip(input_embeddings(full), input_embeddings(init_only)):
        torch.testing.assert_close(emb_f.weight, embedding_factor(depth[role]) * emb_i.weight, rtol=1e-6, atol=0)
    # no LayerNorm/RMSNorm left anywhere in the transformer body
    body = full.base_model
    assert not [n for n, m in body.named_modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))]
    ids = torch.randint(3, 96, (2, 8))
    assert torch.isfinite(full(input_ids=ids, labels=ids).loss)


def test_xavier_is_per_logical_projection_gpt2_fused_qkv():
    full, init_only = _applied(_gpt2)
    block_f, block_i = full.transformer.h[0], init_only.transformer.h[0]
    w_f, w_i = block_f.attn.c_attn.weight, block_i.attn.c_attn.weight  # Conv1D: (in, 3*out), v = last third
    f = (9 * 3) ** -0.25
    torch.testing.assert_close(w_f[:, 2 * D :], f * w_i[:, 2 * D :], rtol=1e-6, atol=0)
    assert torch.equal(w_f[:, : 2 * D], w_i[:, : 2 * D])
    bound = math.sqrt(6 / (D + D))  # Xavier-uniform of one (D, D) part; the fused (D, 3D) bound would be sqrt(6/4D)
    for part in range(3):
        w = w_i[:, part * D : (part + 1) * D]
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.count_nonzero(block_i.attn.c_attn.bias) == 0


def test_embedding_init_gaussian_std_and_padding_and_tied_head():
    torch.manual_seed(0)
    model = _bert()
    t_fixup_init(model, torch.Generator().manual_seed(0))
    word = model.bert.embeddings.word_embeddings.weight
    assert torch.count_nonzero(word[0]) == 0  # padding row
    assert word[1:].std().item() == pytest.approx(D**-0.5, rel=0.05)
    # tied MLM decoder is the same tensor, so it is scaled with the embeddings (as in the reference code)
    assert model.cls.predictions.decoder.weight is word
    before = word.detach().clone()
    apply_t_fixup(model, reinit=False)
    torch.testing.assert_close(model.cls.predictions.decoder.weight, before * (9 * 4) ** -0.25, rtol=1e-6, atol=0)


def test_shared_encoder_decoder_embedding_scaled_once_with_encoder_depth():
    full, init_only = _applied(_t5)
    assert [(r, n) for r, n, _ in input_embeddings(full)] == [("encoder", "shared")]
    torch.testing.assert_close(full.shared.weight, (9 * 3) ** -0.25 * init_only.shared.weight, rtol=1e-6, atol=0)
    assert full.lm_head.weight is full.shared.weight and full.decoder.embed_tokens.weight is full.shared.weight
    # decoder cross-attention v/o get the decoder factor (9*2)^-1/4, encoder blocks 0.67 * 3^-1/4
    dec_f, dec_i = full.decoder.block[1].layer[1].EncDecAttention, init_only.decoder.block[1].layer[1].EncDecAttention
    torch.testing.assert_close(dec_f.o.weight, 18**-0.25 * dec_i.o.weight, rtol=1e-6, atol=0)
    enc_f, enc_i = full.encoder.block[0].layer[1].DenseReluDense, init_only.encoder.block[0].layer[1].DenseReluDense
    torch.testing.assert_close(enc_f.wo.weight, 0.67 * 3**-0.25 * enc_i.wo.weight, rtol=1e-6, atol=0)


def test_norm_removal_undo_restores_the_modules():
    model = _llama(2)
    norms = [model.model.layers[0].input_layernorm, model.model.norm]
    patches = apply_t_fixup(model)
    assert isinstance(model.model.norm, nn.Identity)
    patches.undo()
    assert model.model.layers[0].input_layernorm is norms[0] and model.model.norm is norms[1]
    assert "model.norm.weight" in dict(model.named_parameters())


def test_keep_norms_and_no_reinit_only_scales():
    model = _llama(2)
    before = copy.deepcopy(model)
    apply_t_fixup(model, reinit=False, remove_norms=False)
    f = 18**-0.25
    torch.testing.assert_close(
        model.model.layers[1].mlp.gate_proj.weight, f * before.model.layers[1].mlp.gate_proj.weight
    )
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, before.model.layers[1].self_attn.k_proj.weight)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


def test_unsupported_architecture_names_the_supported_ones():
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=96)
    )
    with pytest.raises(RecipeError, match=r"GPTNeoXLayer blocks are not supported; supported: .*GPT2Block"):
        apply_t_fixup(neox)
    with pytest.raises(RecipeError, match="not supported here"):
        apply_t_fixup(nn.Linear(2, 2))


def test_config_and_contract():
    assert get_technique("t_fixup") is TFixupTechnique
    assert {"fixup", "deepnorm"} <= TFixupTechnique.conflicts and TFixupTechnique.order == 100
    assert all(f.description for n, f in TFixupConfig.model_fields.items() if n != "name")
    with pytest.raises(pydantic.ValidationError):
        TFixupConfig(scale=2)


def test_warmup_conflict_is_a_recipe_error(tiny_recipe):
    recipe = Recipe.parse(tiny_recipe(training={"warmup_steps": 10}, techniques=[{"name": "t_fixup"}]))
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.disable_warmup: .*warmup_steps=10"):
        make_techniques(recipe)


def test_trains_through_a_recipe_with_efftrainer(tiny_recipe):
    recipe = Recipe.parse(
        tiny_recipe(training={"lr_scheduler_type": "linear", "max_steps": 4}, techniques=[{"name": "t_fixup"}])
    )
    built = build(recipe)
    assert type(built.trainer).__name__ == "EffTrainer" and built.args.warmup_steps == 0
    assert isinstance(built.model.model.layers[0].input_layernorm, nn.Identity)
    built.trainer.train()
    losses = [e["loss"] for e in built.trainer.state.log_history if "loss" in e]
    # no final norm and small embeddings: near-uniform logits at first, so a slow but steady start
    assert all(math.isfinite(x) for x in losses) and all(b < a for a, b in zip(losses, losses[1:])), losses
    facts = built.techniques[0].report()
    assert facts["stacks"]["decoder"]["block_factor"] == pytest.approx(18**-0.25)  # 2 layers: (9*2)^-1/4
    assert facts["norms_removed"] == 5  # 2 per layer + the final norm
