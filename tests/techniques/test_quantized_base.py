"""quantized_base: int8 (LLM.int8()) and NF4 + double quantization (QLoRA) frozen bases under LoRA, on the CPU."""

from __future__ import annotations

import pytest
import torch

from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.recipe import Recipe
from hf_efftrain.core.run import train as run_train
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.peft import apply_peft
from hf_efftrain.techniques.quantized_base import (
    QuantizedBaseTechnique,
    bnb_config,
    quantize_model,
    quantized_linears,
    weight_memory,
)

bnb = pytest.importorskip("bitsandbytes")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fp32_linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEARS}


def test_int8_weights_are_rowwise_absmax_codes_and_outputs_stay_close(tiny):
    fp32 = tiny.model()
    weights = _fp32_linears(fp32)
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        want = fp32(input_ids=x).logits
    model = quantize_model(tiny.model(), bnb_config(8))
    layers = dict(quantized_linears(model))
    assert set(layers) == set(weights)  # every block Linear, not the lm_head (transformers keeps it)
    for name, layer in layers.items():
        w = weights[name]
        assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
        assert layer.weight.untyped_storage().nbytes() == w.numel()  # one byte per weight
        # LLM.int8() vector-wise quantization: per output row, codes round(127 * w / absmax(row)).
        absmax = w.abs().amax(dim=1, keepdim=True)
        torch.testing.assert_close(layer.weight.SCB, absmax.squeeze(1), rtol=1e-3, atol=0)
        codes = torch.round(127 * w / absmax)
        assert (layer.weight.float() - codes).abs().max() <= 1  # the stored scale is fp16-rounded
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    memory = weight_memory(model)
    assert memory["weight_bytes"] < weight_memory(fp32)["weight_bytes"] == memory["float32_weight_bytes"]


def test_nf4_double_quant_packs_two_weights_per_byte_within_the_nf4_grid(tiny):
    weights = _fp32_linears(tiny.model())
    model = quantize_model(tiny.model(), bnb_config(4, quant_type="nf4", double_quant=True))
    nf4 = bnb.functional.get_4bit_type("nf4", device="cpu")
    half_gap = (nf4[1:] - nf4[:-1]).max() / 2
    for name, layer in quantized_linears(model):
        w, state = weights[name], layer.weight.quant_state
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
        assert layer.weight.numel() * 2 == w.numel() and state.quant_type == "nf4" and state.nested
        # QLoRA: blocks of 64 weights, each scaled by its absmax onto the 16 NF4 levels; with double quantization
        # the absmax itself is stored in 8 bits, so allow 2% on the block scale.
        deq = bnb.functional.dequantize_4bit(layer.weight.data, state).float()
        blocks = w.reshape(-1, state.blocksize)
        bound = blocks.abs().amax(dim=1, keepdim=True) * (half_gap * 1.02) + 0.02 * blocks.abs().amax(1, True)
        assert ((deq.reshape_as(blocks) - blocks).abs() <= bound).all(), name
    assert weight_memory(model)["weight_bytes"] < weight_memory(quantize_model(tiny.model(), bnb_config(8)))[
        "weight_bytes"]  # fmt: skip


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_quantized_base_trains(tiny, bits):
    tech = QuantizedBaseTechnique(bits=bits)
    model = apply_peft(tech.on_model(tiny.model()), "lora", r=8, target_modules="all-linear")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer = tiny.train(model, tiny.args(max_steps=4 if bits == 8 else 3, learning_rate=2e-2))
    losses = tiny.losses(trainer)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    report = tech.report()
    assert report["bits"] == bits and report["quantized_layers"] == 14
    assert report["weight_bytes"] < report["unquantized_weight_bytes"]


def test_builtin_recipe_quantizes_trains_and_reports(tiny_recipe):
    recipe = tiny_recipe(
        training={"max_steps": 4},
        techniques=[{"name": "peft", "r": 4}, {"name": "quantized_base", "bits": 8}],
    )
    report = run_train(Recipe.parse(recipe))
    assert report["train_loss_final"] < report["train_loss_first"]
    assert report["params_trainable"] * 50 < report["params_total"]
    quant = next(t for t in report["techniques"] if t["name"] == "quantized_base")["report"]
    assert quant["quantized_layers"] > 0 and quant["weight_bytes"] < quant["unquantized_weight_bytes"]


def test_local_folder_is_quantized_by_from_pretrained(tiny_recipe, tmp_path):
    source = build(Recipe.parse(tiny_recipe()))
    folder = tmp_path / "local_model"
    source.model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    recipe = tiny_recipe(
        model={"name_or_path": str(folder), "config_overrides": {}},
        techniques=[{"name": "quantized_base", "bits": 8}, {"name": "peft", "r": 4}],
    )
    built = build(Recipe.parse(recipe))
    base = built.model.get_base_model()
    assert base.is_loaded_in_8bit and base.config.quantization_config.load_in_8bit  # from_pretrained did it
    assert [t.name for t in built.techniques] == ["quantized_base", "peft"]  # quantize before wrapping
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in base.modules())


def test_recipe_errors(tiny_recipe):
    alone = Recipe.parse(tiny_recipe(techniques=[{"name": "quantized_base"}]))
    with pytest.raises(RecipeError, match=r"techniques\[0\]: quantized_base requires peft"):
        make_techniques(alone)
    wrong = Recipe.parse(tiny_recipe(techniques=[{"name": "quantized_base", "bits": 8, "quant_type": "nf4"},
                                                 {"name": "peft"}]))  # fmt: skip
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.quant_type: only used with bits: 4"):
        make_techniques(wrong)


def test_paged_optimizer_only_on_cuda_and_not_over_a_users_optim(tiny, tiny_recipe):
    tech = QuantizedBaseTechnique(bits=4)
    default = tiny.args().optim
    args = tech.training_args(tiny.args())
    expected = "paged_adamw_8bit" if torch.cuda.is_available() else default
    assert args.optim == expected
    recipe = Recipe.parse(tiny_recipe(training={"optim": "adafactor"},
                                      techniques=[{"name": "quantized_base"}, {"name": "peft"}]))  # fmt: skip
    user = make_techniques(recipe)[0]
    assert user.training_args(tiny.args(optim="adafactor")).optim == "adafactor"


@pytest.mark.gpu
def test_qlora_on_cuda_uses_nf4_and_the_paged_8bit_optimizer(tiny_recipe):
    recipe = tiny_recipe(techniques=[{"name": "quantized_base", "bits": 4}, {"name": "peft", "r": 4}])
    built = build(Recipe.parse(recipe))
    assert built.args.optim == "paged_adamw_8bit"
    built.trainer.train()
    opt = built.trainer.optimizer
    opt = getattr(opt, "optimizer", opt)
    assert type(opt).__module__.startswith("bitsandbytes") and opt.is_paged and opt.args.optim_bits == 8
    base = built.model.get_base_model()
    assert base.is_loaded_in_4bit and next(base.parameters()).device.type == "cuda"
