"""Fixup (Zhang et al. 2019, arXiv 1901.09321) adapted to Transformer blocks: every block is exactly the identity at
init, the L^(-1/(2m-2)) scales by hand, learnable scalar gains/biases that move in training, undo."""

from __future__ import annotations

import copy

import pydantic
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from hf_efftrain import Recipe
from hf_efftrain.core.build import build
from hf_efftrain.core.registry import get_technique
from hf_efftrain.techniques.fixup import (
    FixupConfig,
    FixupTechnique,
    InputBias,
    ScaledOutput,
    apply_fixup,
    fixup_scale,
)

D = 32


def _gpt2(n=2):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=n, n_head=4, n_positions=32, vocab_size=96)).eval()


def _bert(n=3):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=D, num_hidden_layers=n, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, vocab_size=96)  # fmt: skip
    return BertForMaskedLM(cfg).eval()


@pytest.mark.parametrize("make", ["llama", "gpt2", "bert"])
def test_every_block_is_exactly_the_identity_at_init(make, tiny):
    model = {"llama": lambda: tiny.model().eval(), "gpt2": _gpt2, "bert": _bert}[make]()
    apply_fixup(model)
    ids = torch.randint(3, 96, (2, 10))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) >= 3
    for h in hidden[1:]:  # embedding output, then one entry per block: all bitwise equal
        assert torch.equal(h, hidden[0])


def test_scales_by_hand_and_zeroed_outputs(tiny):
    model = tiny.model()  # Llama, 2 layers: L = 4 branches
    before = copy.deepcopy(model)
    apply_fixup(model)
    layer, old = model.model.layers[1], before.model.layers[1]
    # attention branch (v -> o, m = 2): v x 4^-1/2 = 0.5; q, k untouched
    torch.testing.assert_close(layer.self_attn.v_proj.weight, 0.5 * old.self_attn.v_proj.weight, rtol=0, atol=0)
    assert torch.equal(layer.self_attn.q_proj.weight, old.self_attn.q_proj.weight)
    # gated MLP (gate, up -> down, m = 3): gate and up x 4^-1/4
    for name in ("gate_proj", "up_proj"):
        torch.testing.assert_close(getattr(layer.mlp, name).weight, 0.5**0.5 * getattr(old.mlp, name).weight)
    assert (
        torch.count_nonzero(layer.self_attn.o_proj.weight) == 0
        and torch.count_nonzero(layer.mlp.down_proj.weight) == 0
    )
    assert isinstance(layer.self_attn.o_proj, ScaledOutput) and isinstance(layer.self_attn.q_proj, InputBias)
    assert isinstance(model.model.norm, nn.Identity)
    assert fixup_scale(4, 2) == 0.5 and fixup_scale(16, 3) == pytest.approx(0.5)


def test_fused_qkv_and_conv1d_gpt2():
    model = _gpt2()
    before = copy.deepcopy(model)
    apply_fixup(model)
    attn, old = model.transformer.h[0].attn, before.transformer.h[0].attn
    w, w0 = attn.c_attn.weight, old.c_attn.weight  # Conv1D (in, 3*out); only the value third is scaled (L = 4)
    assert torch.equal(w[:, : 2 * D], w0[:, : 2 * D])
    torch.testing.assert_close(w[:, 2 * D :], 0.5 * w0[:, 2 * D :], rtol=0, atol=0)
    assert isinstance(attn.c_attn, InputBias) and isinstance(attn.c_attn.inner, type(old.c_attn))  # one bias
    assert torch.count_nonzero(attn.c_proj.weight) == 0 and torch.count_nonzero(attn.c_proj.inner.bias) == 0


def test_encoder_decoder_counts_cross_attention_branches():
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(
            d_model=D,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            vocab_size=96,
            decoder_start_token_id=0,
        )  # fmt: skip
    )
    before = copy.deepcopy(t5)
    apply_fixup(t5)
    # L = 2 encoder layers x 2 branches + 2 decoder layers x 3 branches = 10
    v, v0 = (
        t5.decoder.block[0].layer[1].EncDecAttention.v.weight,
        before.decoder.block[0].layer[1].EncDecAttention.v.weight,
    )
    torch.testing.assert_close(v, 10**-0.5 * v0)
    assert isinstance(t5.decoder.block[0].layer[1].EncDecAttention.o, ScaledOutput)
    ids = torch.randint(3, 96, (2, 6))
    assert torch.isfinite(t5(input_ids=ids, labels=ids).loss)  # T5's FF code reads wo.weight.dtype: still works


def test_undo_unwraps_and_restores_norms():
    model = _bert()
    names = set(dict(model.named_parameters()))
    o_proj = model.bert.encoder.layer[0].attention.output.dense
    ln = model.bert.encoder.layer[0].output.LayerNorm
    patches = apply_fixup(model)
    assert {n for n in dict(model.named_parameters()) if n.endswith(".gain")}
    patches.undo()
    assert model.bert.encoder.layer[0].attention.output.dense is o_proj
    assert model.bert.encoder.layer[0].output.LayerNorm is ln
    assert set(dict(model.named_parameters())) == names


def test_gains_and_scalar_biases_learn_with_the_stock_trainer(tiny):
    model = tiny.model()
    apply_fixup(model)
    trainer = tiny.train(model, tiny.args(max_steps=8, learning_rate=3e-3))
    params = dict(model.named_parameters())
    gains = [p for n, p in params.items() if n.endswith(".gain")]
    biases = [p for n, p in params.items() if n.endswith((".bias_in", ".bias_out", ".bias"))]
    assert len(gains) == 4 and all(p.requires_grad for p in gains)
    assert any(abs(p.item() - 1.0) > 1e-4 for p in gains)  # multipliers moved from 1
    assert any(abs(p.item()) > 1e-4 for p in biases)  # scalar biases moved from 0
    assert torch.count_nonzero(model.model.layers[0].mlp.down_proj.weight) > 0
    losses = tiny.losses(trainer)
    assert losses[-1] < losses[0] - 0.01, losses  # slow start: no final norm rescales the tiny embeddings


def test_config_contract_and_recipe(tiny_recipe):
    assert get_technique("fixup") is FixupTechnique and "t_fixup" in FixupTechnique.conflicts
    assert all(f.description for n, f in FixupConfig.model_fields.items() if n != "name")
    with pytest.raises(pydantic.ValidationError):
        FixupConfig(remove_norm=False)
    built = build(Recipe.parse(tiny_recipe(techniques=[{"name": "fixup", "remove_norms": False}])))
    layer = built.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, ScaledOutput) and type(layer.input_layernorm).__name__ == "LlamaRMSNorm"
    assert built.techniques[0].report()["residual_branches"] == 4
