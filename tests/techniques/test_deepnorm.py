"""DeepNorm (Wang et al. 2022, arXiv 2203.00555): alpha/beta of the three settings against the paper's formulas,
block outputs equal LN(alpha x + f(x)) computed by hand (BERT post-LN, Llama and GPT-2 converted from pre-LN), the
Xavier-normal gain beta init, undo, the unsupported-architecture error, and training through a recipe."""

from __future__ import annotations

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
    T5Config,
    T5ForConditionalGeneration,
)

from hf_efftrain import Recipe, RecipeError
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.registry import get_technique
from hf_efftrain.techniques.deepnorm import DeepnormConfig, DeepnormTechnique, apply_deepnorm, deepnorm_constants

D = 32


def test_constants_of_the_three_settings_against_the_paper():
    # encoder-only, N = 6: alpha = (2N)^1/4 = 12^0.25, beta = (8N)^-1/4 = 48^-0.25
    a, b = deepnorm_constants(n_encoder=6)["encoder"]
    assert a == pytest.approx(1.861210, abs=1e-6) and b == pytest.approx(0.379918, abs=1e-6)
    # decoder-only, M = 12: alpha = 24^0.25, beta = 96^-0.25
    a, b = deepnorm_constants(n_decoder=12)["decoder"]
    assert a == pytest.approx(2.213364, abs=1e-6) and b == pytest.approx(0.319472, abs=1e-6)
    # encoder-decoder, N = M = 6: encoder alpha = 0.81 (N^4 M)^(1/16) = 0.81 * 6^(5/16), beta = 0.87 * 6^(-5/16);
    # decoder alpha = (3M)^1/4 = 18^0.25, beta = (12M)^-1/4 = 72^-0.25
    c = deepnorm_constants(n_encoder=6, n_decoder=6)
    assert c["encoder"] == pytest.approx((1.417938, 0.496989), abs=1e-5)
    assert c["decoder"] == pytest.approx((2.059767, 0.343295), abs=1e-5)
    # asymmetric depths use N for the encoder and M for the decoder: 0.81 * (100^4 * 2)^(1/16)
    c = deepnorm_constants(n_encoder=100, n_decoder=2)
    assert c["encoder"][0] == pytest.approx(0.81 * 100**0.25 * 2 ** (1 / 16))
    assert c["decoder"] == pytest.approx((6**0.25, 24**-0.25))
    with pytest.raises(ValueError):
        deepnorm_constants()


def _bert(n=3):
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=D,
        num_hidden_layers=n,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        vocab_size=96,
    )
    return BertForMaskedLM(cfg).eval()


def test_bert_block_is_post_ln_with_alpha_by_hand_and_undo():
    model = _bert()
    patches = apply_deepnorm(model, generator=torch.Generator().manual_seed(0))
    alpha = (2 * 3) ** 0.25
    layer = model.bert.encoder.layer[1]
    x = torch.randn(2, 5, D)

    def by_hand(a: float) -> torch.Tensor:
        f1 = layer.attention.output.dense(layer.attention.self(x)[0])
        h = layer.attention.output.LayerNorm(a * x + f1)
        f2 = layer.output.dense(layer.intermediate(h))
        return layer.output.LayerNorm(a * h + f2)

    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand(alpha))
        assert not torch.allclose(by_hand(alpha), by_hand(1.0), atol=1e-3)  # alpha matters here
        patches.undo()
        assert "forward" not in vars(layer.attention.output) and "forward" not in vars(layer.output)
        torch.testing.assert_close(layer(x), by_hand(1.0))  # the stock post-LN block again
    assert type(model.bert.embeddings.LayerNorm) is nn.LayerNorm  # native post-LN: embedding norm stays


def test_llama_is_converted_to_post_ln_by_hand_and_undo(tiny):
    model = tiny.model().eval()  # 2 decoder layers
    final_norm = model.model.norm
    patches = apply_deepnorm(model)
    alpha = (2 * 2) ** 0.25
    layer = model.model.layers[0]
    x = torch.randn(1, 6, 64)
    pos = torch.arange(6)[None]
    pe = model.model.rotary_emb(x, pos)
    kwargs = {"attention_mask": None, "position_ids": pos, "position_embeddings": pe}
    with torch.no_grad():
        attn = layer.self_attn(hidden_states=x, **kwargs)[0]
        h = layer.input_layernorm(alpha * x + attn)
        expected = layer.post_attention_layernorm(alpha * h + layer.mlp(h))
        torch.testing.assert_close(layer(x, **kwargs), expected)
        assert isinstance(model.model.norm, nn.Identity)  # post-LN output is already normalized
        ids = torch.randint(3, 128, (2, 8))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
        patches.undo()
        assert model.model.norm is final_norm and "forward" not in vars(layer)
        pre_ln = x + layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]
        pre_ln = pre_ln + layer.mlp(layer.post_attention_layernorm(pre_ln))
        torch.testing.assert_close(layer(x, **kwargs), pre_ln)


def test_gpt2_positional_call_converted_to_post_ln():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=4, n_head=4, n_positions=32, vocab_size=96)).eval()
    apply_deepnorm(model)
    alpha = 8**0.25
    block = model.transformer.h[2]
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        h = block.ln_1(alpha * x + block.attn(x)[0])
        expected = block.ln_2(alpha * h + block.mlp(h))
        torch.testing.assert_close(block(x, None, None, None), expected)  # GPT2Model passes arguments by position
        ids = torch.randint(3, 96, (2, 8))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_init_is_xavier_normal_with_gain_beta():
    model = _bert(n=8)
    apply_deepnorm(model, generator=torch.Generator().manual_seed(0))
    beta = (8 * 8) ** -0.25  # 0.3536
    xavier = lambda w: math.sqrt(2 / sum(w.shape))  # noqa: E731
    stds = {"q": [], "v": [], "o": [], "fc1": [], "fc2": []}
    for layer in model.bert.encoder.layer:
        for key, w in (
            ("q", layer.attention.self.query.weight),
            ("v", layer.attention.self.value.weight),
            ("o", layer.attention.output.dense.weight),
            ("fc1", layer.intermediate.dense.weight),
            ("fc2", layer.output.dense.weight),
        ):
            stds[key].append(w.std().item() / xavier(w))
    assert sum(stds["q"]) / 8 == pytest.approx(1.0, rel=0.03)
    for key in ("v", "o", "fc1", "fc2"):
        assert sum(stds[key]) / 8 == pytest.approx(beta, rel=0.03), key


def _t5(n=3, m=2):
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=96,
        d_model=D,
        d_kv=8,
        d_ff=64,
        num_layers=n,
        num_decoder_layers=m,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg).eval()


def test_t5_sublayers_are_converted_to_post_ln_with_the_encoder_decoder_constants():
    model = _t5()
    final_norms = model.encoder.final_layer_norm, model.decoder.final_layer_norm
    patches = apply_deepnorm(model, generator=torch.Generator().manual_seed(0))
    c = deepnorm_constants(n_encoder=3, n_decoder=2)
    x, enc = torch.randn(2, 5, D), torch.randn(2, 7, D)
    with torch.no_grad():
        for role, block in (("encoder", model.encoder.block[1]), ("decoder", model.decoder.block[0])):
            alpha = c[role][0]
            sa = block.layer[0]
            attn, *_ = sa.SelfAttention(x)
            h = sa.layer_norm(alpha * x + attn)
            torch.testing.assert_close(sa(x)[0], h)
            if role == "decoder":
                ca = block.layer[1]
                cross, *_ = ca.EncDecAttention(h, key_value_states=enc)
                torch.testing.assert_close(ca(h, enc)[0], ca.layer_norm(alpha * h + cross))
            ff = block.layer[-1]
            torch.testing.assert_close(ff(h), ff.layer_norm(alpha * h + ff.DenseReluDense(h)))
        assert isinstance(model.encoder.final_layer_norm, nn.Identity)  # post-LN outputs are already normalized
        assert isinstance(model.decoder.final_layer_norm, nn.Identity)
        ids = torch.randint(3, 96, (2, 8))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
        patches.undo()
        assert (model.encoder.final_layer_norm, model.decoder.final_layer_norm) == final_norms
        sa = model.encoder.block[1].layer[0]
        assert "forward" not in vars(sa)
        torch.testing.assert_close(sa(x)[0], x + sa.SelfAttention(sa.layer_norm(x))[0])  # stock pre-LN again


def test_bart_residuals_are_scaled_by_alpha_by_hand_and_undo():
    torch.manual_seed(0)
    cfg = BartConfig(
        vocab_size=96, d_model=D, encoder_layers=4, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
    )  # fmt: skip
    model = BartForConditionalGeneration(cfg).eval()
    patches = apply_deepnorm(model)
    c = deepnorm_constants(n_encoder=4, n_decoder=2)
    layer, x, enc = model.model.decoder.layers[1], torch.randn(2, 5, D), torch.randn(2, 7, D)

    def by_hand(a: float) -> torch.Tensor:
        h = layer.self_attn_layer_norm(a * x + layer.self_attn(x)[0])
        h = layer.encoder_attn_layer_norm(a * h + layer.encoder_attn(h, key_value_states=enc)[0])
        return layer.final_layer_norm(a * h + layer.fc2(layer.activation_fn(layer.fc1(h))))

    with torch.no_grad():
        torch.testing.assert_close(layer(x, encoder_hidden_states=enc), by_hand(c["decoder"][0]))
        enc_layer = model.model.encoder.layers[0]
        a = c["encoder"][0]
        h = enc_layer.self_attn_layer_norm(a * x + enc_layer.self_attn(x)[0])
        expected = enc_layer.final_layer_norm(a * h + enc_layer.fc2(enc_layer.activation_fn(enc_layer.fc1(h))))
        torch.testing.assert_close(enc_layer(x, None), expected)
        ids = torch.randint(3, 96, (2, 8))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
        assert type(model.model.encoder.layernorm_embedding) is nn.LayerNorm  # native post-LN: embedding norm stays
        patches.undo()
        torch.testing.assert_close(layer(x, encoder_hidden_states=enc), by_hand(1.0))  # the stock layer again


def test_unsupported_architecture_is_a_recipe_error_at_validate(tiny_recipe, monkeypatch):
    from hf_efftrain.techniques import deepnorm

    recipe = Recipe.parse(
        tiny_recipe(
            model={"name_or_path": "builtin:tiny-bert", "config_overrides": {}}, techniques=[{"name": "deepnorm"}]
        )
    )
    make_techniques(recipe)  # supported
    monkeypatch.delitem(deepnorm._POLICIES, "BertLayer")
    with pytest.raises(RecipeError, match=r"techniques\[0\]: deepnorm does not support BertLayer.*: BartDecoderLayer"):
        make_techniques(recipe)


def test_trains_t5_seq2seq_through_a_recipe(tiny_recipe):
    recipe = Recipe.parse(
        tiny_recipe(
            model={"name_or_path": "builtin:tiny-t5", "config_overrides": {"num_layers": 2, "num_decoder_layers": 2}},
            data={"train": "builtin:sft-synthetic"},
            techniques=[{"name": "deepnorm"}],
        )
    )
    built = build(recipe)
    assert built.task == "seq2seq"
    built.trainer.train()
    losses = [e["loss"] for e in built.trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    c = deepnorm_constants(n_encoder=2, n_decoder=2)
    assert built.techniques[0].report()["alpha_beta"] == {r: pytest.approx(list(ab)) for r, ab in c.items()}


def test_config_contract():
    assert get_technique("deepnorm") is DeepnormTechnique and DeepnormTechnique.order == 100
    assert {"t_fixup", "fixup"} <= DeepnormTechnique.conflicts
    assert all(f.description for n, f in DeepnormConfig.model_fields.items() if n != "name")
    with pytest.raises(pydantic.ValidationError):
        DeepnormConfig(alpha=2.0)


def test_trains_bert_masked_lm_through_a_recipe(tiny_recipe):
    recipe = Recipe.parse(
        tiny_recipe(
            model={"name_or_path": "builtin:tiny-bert", "config_overrides": {"num_hidden_layers": 2}},
            techniques=[{"name": "deepnorm"}],
        )
    )
    built = build(recipe)
    assert built.task == "masked_lm"
    built.trainer.train()
    losses = [e["loss"] for e in built.trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert built.techniques[0].report()["alpha_beta"]["encoder"] == pytest.approx([4**0.25, 16**-0.25])
