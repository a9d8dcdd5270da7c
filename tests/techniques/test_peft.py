"""peft: LoRA / DoRA / rsLoRA / LoRA+ / IA3 / prefix tuning through PEFT, checked against the papers' formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.recipe import Recipe
from hf_efftrain.core.run import train as run_train
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.peft import (
    LoraPlusFactory,
    MergeAndSaveCallback,
    PeftTechnique,
    apply_peft,
    lora_scaling,
    task_type_of,
)


def _linears(model, names):
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names]


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_trains_only_adapters_with_the_analytic_count(tiny, targets):
    base = tiny.model()
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected = sum(4 * (m.in_features + m.out_features) for m in _linears(base, targets if targets != "all-linear"
                                                                              else names))  # fmt: skip
    model = apply_peft(base, "lora", r=4, lora_alpha=8, target_modules=targets)
    trainable = _trainable(model)
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(s == pytest.approx(8 / 4) for s in lora_scaling(model).values())  # LoRA: alpha / r


def test_training_moves_adapters_keeps_base_and_lowers_loss(tiny):
    model = PeftTechnique(method="lora", r=8, target_modules="all-linear").on_model(tiny.model())
    before = _base_state(model)
    b_before = {n: p.detach().clone() for n, p in _trainable(model).items() if "lora_B" in n}
    trainer = tiny.train(model, tiny.args(max_steps=8, learning_rate=1e-2))
    losses = tiny.losses(trainer)
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert all(not torch.equal(dict(model.named_parameters())[n], b) for n, b in b_before.items())


def test_rslora_scaling_is_alpha_over_sqrt_r(tiny):
    model = apply_peft(tiny.model(), "rslora", r=16, lora_alpha=8, target_modules=["q_proj"])
    scalings = lora_scaling(model)
    assert scalings and all(s == pytest.approx(8 / math.sqrt(16)) for s in scalings.values())


def test_dora_layer_is_magnitude_times_normalised_direction(tiny):
    model = apply_peft(tiny.model(), "dora", r=4, lora_alpha=8, target_modules=["o_proj"])
    layer = next(m for n, m in model.named_modules() if n.endswith("o_proj") and hasattr(m, "lora_B"))
    torch.manual_seed(1)
    with torch.no_grad():  # B is zero at init (DoRA == base then); make the update non-trivial
        layer.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.rand_like(layer.lora_magnitude_vector[
            "default"].weight))  # fmt: skip
    model.eval()
    w = layer.base_layer.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    assert s == pytest.approx(8 / 4)
    updated = w + s * b @ a
    m = layer.lora_magnitude_vector["default"].weight
    reference_weight = (m / updated.norm(dim=1))[:, None] * updated  # Liu et al. 2024, eq. (5): ||.|| per output
    x = torch.randn(3, 5, w.shape[1])
    torch.testing.assert_close(layer(x), x @ reference_weight.T, rtol=1e-5, atol=1e-5)
    count = sum(p.numel() for p in _trainable(model).values())
    assert count == sum(4 * (o.in_features + o.out_features) + o.out_features for o in _linears(tiny.model(), {
        "o_proj"}))  # fmt: skip


def test_loraplus_optimizer_puts_b_at_ratio_times_lr(tiny):
    tech = PeftTechnique(method="loraplus", r=4, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=8)
    model = tech.on_model(tiny.model())
    args = tiny.args(max_steps=3, learning_rate=2e-3)
    cls_kwargs = tech.optimizer_cls_and_kwargs(args)
    assert cls_kwargs[0] is LoraPlusFactory
    trainer = tiny.train(model, args, optimizer_cls_and_kwargs=cls_kwargs)
    lr_of = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    named = _trainable(model)
    assert [lr_of[id(p)] for n, p in named.items() if "lora_B" in n] == [pytest.approx(2e-3 * 8)] * 4
    assert [lr_of[id(p)] for n, p in named.items() if "lora_A" in n] == [pytest.approx(2e-3)] * 4
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.AdamW)  # fmt: skip
    assert len(lr_of) == len(named)


def test_merge_and_save_reloads_with_the_same_logits(tiny, tmp_path):
    tech = PeftTechnique(method="lora", r=4, target_modules="all-linear", merge_and_save=True)
    tiny.model().save_pretrained(tmp_path / "base")  # the merge reloads the base from its folder (no deepcopy)
    model = tech.on_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    callbacks = tech.callbacks()
    assert isinstance(callbacks[0], MergeAndSaveCallback)
    args = tiny.args(max_steps=4, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=tiny.rows(), callbacks=callbacks)
    trainer.train()
    folder = tmp_path / "merged"
    assert callbacks[0].saved_to == folder
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    x = torch.randint(3, 128, (2, 16))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
        got = merged(input_ids=x).logits
        base = tiny.model()(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (base - want).abs().max() > 1e-3  # the adapters did change the model
    assert any("lora_B" in n for n, _ in model.named_parameters())  # the adapter model itself is untouched


def test_ia3_trains_only_scaling_vectors(tiny):
    model = PeftTechnique(method="ia3").on_model(tiny.model())
    trainable = _trainable(model)
    assert trainable and all("ia3_l" in n for n in trainable)
    # (IA)^3 on llama (PEFT's defaults k_proj, v_proj, down_proj): one vector per output, or per input for FFN.
    expected = sum(m.out_features for m in _linears(tiny.model(), {"k_proj", "v_proj"}))
    expected += sum(m.in_features for m in _linears(tiny.model(), {"down_proj"}))
    assert sum(p.numel() for p in trainable.values()) == expected
    before = _base_state(model)
    losses = tiny.losses(tiny.train(model, tiny.args(max_steps=6, learning_rate=5e-2)))
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_prefix_tuning_trains_the_prefix(tiny):
    model = PeftTechnique(method="prefix_tuning", num_virtual_tokens=4).on_model(tiny.model())
    trainable = _trainable(model)
    cfg = tiny.config()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # PEFT's prefix: num_virtual_tokens x (layers * 2 * kv_heads * head_dim) key/value embeddings
    expected = 4 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim
    assert sum(p.numel() for p in trainable.values()) == expected
    losses = tiny.losses(tiny.train(model, tiny.args(max_steps=6, learning_rate=5e-2)))
    assert losses[-1] < losses[0]


def test_unknown_target_module_names_valid_ones(tiny):
    with pytest.raises(
        RecipeError, match=r"target_modules: not found in LlamaForCausalLM: qproj; valid names: .*q_proj"
    ):
        apply_peft(tiny.model(), "lora", target_modules=["q_proj", "qproj"])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"method": "ia3", "r": 4}, "r"),
        ({"method": "lora", "num_virtual_tokens": 4}, "num_virtual_tokens"),
        ({"method": "dora", "loraplus_lr_ratio": 4}, "loraplus_lr_ratio"),
        ({"method": "prefix_tuning", "target_modules": ["q_proj"]}, "target_modules"),
        ({"method": "prefix_tuning", "merge_and_save": True}, "merge_and_save"),
    ],
)
def test_fields_of_another_method_are_recipe_errors(tiny_recipe, fields, field):
    recipe = Recipe.parse(tiny_recipe(techniques=[{"name": "peft", **fields}]))
    with pytest.raises(RecipeError, match=rf"techniques\[0\]\.{field}: "):
        make_techniques(recipe)


def test_classification_head_is_saved_and_seq2seq_task_type(tiny_recipe):
    recipe = Recipe.parse(
        tiny_recipe(
            model={"name_or_path": "builtin:tiny-bert", "config_overrides": {"num_hidden_layers": 1}},
            data={"train": "builtin:cls-synthetic", "max_train_samples": 16},
            techniques=[{"name": "peft", "r": 2}],
        )
    )
    built = build(recipe)
    assert type(built.model).__name__ == "PeftModelForSequenceClassification"
    trainable = _trainable(built.model)
    assert any("classifier" in n and "modules_to_save" in n for n in trainable)  # the new head trains in full
    assert all("lora_" in n or "classifier" in n for n in trainable)
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32))
    assert task_type_of(t5) == "SEQ_2_SEQ_LM"


def test_recipe_run_writes_adapter_and_report(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    report = run_train(Recipe.parse(tiny_recipe(techniques=[{"name": "peft", "method": "loraplus", "r": 4}])))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    assert report["params_trainable"] * 20 < report["params_total"]
    assert report["train_loss_final"] < report["train_loss_first"]
    saved = json.loads((out / "run_report.json").read_text())
    assert saved["techniques"][0]["report"]["params_adapter"] == report["params_trainable"]


def test_local_pretrained_folder_with_merge(tiny_recipe, tmp_path):
    source = build(Recipe.parse(tiny_recipe()))
    folder = tmp_path / "local_model"
    source.model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    recipe = tiny_recipe(
        model={"name_or_path": str(folder), "config_overrides": {}},
        training={"max_steps": 3, "output_dir": str(tmp_path / "local_run")},
        techniques=[{"name": "peft", "method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"],
                     "merge_and_save": True}],
    )  # fmt: skip
    report = run_train(Recipe.parse(recipe))
    adapter = json.loads((tmp_path / "local_run" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "local_run" / "merged")
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in source.model.parameters())
    assert report["techniques"][0]["report"]["merged_model"].endswith("merged")
