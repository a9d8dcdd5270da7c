"""large_batch: accumulation steps, lr scaling (linear / sqrt) and warmup rules by hand, the recipe errors, that
accumulation really gives the target batch with the stock Trainer, and its composition with lion / lamb by order."""

from __future__ import annotations

import math

import pytest
import torch

from hf_efftrain import Recipe, train
from hf_efftrain.core.build import make_techniques, make_training_args
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import ORDER_DEFAULT, Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.large_batch import (
    LargeBatchConfig,
    LargeBatchTechnique,
    apply_large_batch,
    large_batch_settings,
)


@pytest.mark.parametrize(
    "scaling, warmup, lr, warmup_steps",
    [
        ("none", "same_steps", 1e-3, 100),
        ("linear", "same_steps", 4e-3, 100),  # k = 64 / 16 = 4
        ("sqrt", "same_samples", 2e-3, 25),  # 100 steps x 16 samples = 1600 samples = 25 steps of 64
    ],
)
def test_settings_by_hand(scaling, warmup, lr, warmup_steps):
    s = large_batch_settings(64, 8, 2, 1e-3, 100, scaling, 16, warmup)
    assert s.gradient_accumulation_steps == 4  # 64 / (8 per device x 2 processes)
    assert s.learning_rate == pytest.approx(lr)
    assert s.warmup_steps == warmup_steps
    assert (s.reference_learning_rate, s.reference_warmup_steps) == (1e-3, 100)


def test_same_samples_keeps_at_least_one_warmup_step_and_leaves_zero_alone():
    assert large_batch_settings(4096, 8, 1, 1e-3, 10, "none", 8, "same_samples").warmup_steps == 1  # 10 / 512
    assert large_batch_settings(64, 8, 1, 1e-3, 0, "none", 8, "same_samples").warmup_steps == 0


@pytest.mark.parametrize(
    "call, path, words",
    [
        (lambda: large_batch_settings(60, 8, 2, 1e-3), "batch_size", ["8 x 2 = 16", "48 or 64"]),
        (lambda: large_batch_settings(8, 8, 2, 1e-3), "batch_size", ["16"]),
        (lambda: large_batch_settings(64, 8, 1, 1e-3, lr_scaling="linear"), "reference_batch_size", ["linear"]),
        (lambda: large_batch_settings(64, 8, 1, 1e-3, 0.1, "none", 8, "same_samples"), "warmup", ["ratio"]),
    ],
)
def test_settings_errors(call, path, words):
    with pytest.raises(RecipeError) as e:
        call()
    assert e.value.path == path
    for w in words:
        assert w in e.value.message


def _recipe(tiny_recipe, training=None, **lb):
    return Recipe.parse(
        tiny_recipe(training=training or {}, techniques=[{"name": "large_batch", "batch_size": 32, **lb}])
    )


def test_validate_errors(tiny_recipe):
    def path_of(recipe, env=None):
        with pytest.raises(RecipeError) as e:
            make_techniques(recipe, env or Env())
        return e.value.path

    # tiny_recipe: per_device_train_batch_size 8.
    assert path_of(_recipe(tiny_recipe), Env(world_size=3)) == "techniques[0].batch_size"
    assert path_of(_recipe(tiny_recipe, {"gradient_accumulation_steps": 2})) == "techniques[0].batch_size"
    assert path_of(_recipe(tiny_recipe, {"auto_find_batch_size": True})) == "techniques[0].batch_size"
    assert path_of(_recipe(tiny_recipe, lr_scaling="sqrt")) == "techniques[0].reference_batch_size"
    assert path_of(_recipe(tiny_recipe, reference_batch_size=8)) == "techniques[0].reference_batch_size"
    make_techniques(_recipe(tiny_recipe, {"gradient_accumulation_steps": 4}), Env())  # agrees: fine
    make_techniques(_recipe(tiny_recipe), Env(world_size=2))  # 32 = 8 x 2 x 2


def test_accumulation_gives_the_target_batch_with_stock_trainer(tiny):
    # One optimizer step over 16 rows in one batch, or 4 micro-batches of 4 accumulated (the Trainer normalises the
    # loss by the tokens of the whole accumulated batch): the same gradient, so with SGD (an update linear in the
    # gradient, unlike Adam's m / sqrt(v), which magnifies rounding where gradients are ~0) the same parameters.
    rows, sgd = tiny.rows(32), (torch.optim.SGD, {"lr": 0.5})

    def run(per_device: int, batch_size: int | None = None):
        args = tiny.args(max_steps=2, per_device_train_batch_size=per_device)
        if batch_size is not None:
            settings = apply_large_batch(args, batch_size)
            assert settings.gradient_accumulation_steps == args.gradient_accumulation_steps == 4
        trainer = tiny.train(tiny.model(), args, rows, optimizer_cls_and_kwargs=sgd)
        assert trainer.state.global_step == 2
        return list(trainer.model.parameters())

    big, accumulated, small = run(16), run(4, batch_size=16), run(4)
    for a, b in zip(big, accumulated):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # ... and not the update of a batch of 4.
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(big, small))


@pytest.mark.parametrize(
    "optimizer, reference_lr",
    [
        ({"name": "lion", "lr": 1e-4}, 1e-4),  # Lion's explicit lr is the reference that gets scaled
        ({"name": "lion", "from_adamw": {"lr": 3e-3}}, 1e-3),  # converted first (3e-3 / 3), then scaled
        ({"name": "lamb", "lr": 2e-3}, 2e-3),
        ({"name": "optimizer", "type": "adamw", "lr": 5e-4}, 5e-4),
        (None, 3e-3),  # the recipe's training.learning_rate
    ],
)
@pytest.mark.parametrize("large_batch_first", [True, False])
def test_lr_scaling_applies_after_optimizer_techniques(tiny_recipe, optimizer, reference_lr, large_batch_first):
    lb = {"name": "large_batch", "batch_size": 32, "lr_scaling": "linear", "reference_batch_size": 8}
    techniques = [lb] + ([optimizer] if optimizer else [])
    if not large_batch_first:
        techniques.reverse()
    recipe = Recipe.parse(tiny_recipe(techniques=techniques))
    built = make_techniques(recipe, Env())
    assert built[-1].name == "large_batch"  # whatever the recipe's order
    args = make_training_args(recipe, built)
    assert args.learning_rate == pytest.approx(4 * reference_lr)
    assert args.gradient_accumulation_steps == 4
    report = built[-1].report()
    assert report["reference_learning_rate"] == pytest.approx(reference_lr)
    assert report["learning_rate"] == pytest.approx(4 * reference_lr)


def test_efftrainer_run_with_lamb_reports_choices(tiny_recipe):
    recipe = tiny_recipe(
        training={"max_steps": 2, "per_device_train_batch_size": 4, "warmup_steps": 8},
        techniques=[
            {"name": "lamb", "lr": 1e-2},
            {"name": "large_batch", "batch_size": 16, "lr_scaling": "sqrt", "reference_batch_size": 4,
             "warmup": "same_samples"},
        ],
    )  # fmt: skip
    report = train(Recipe.parse(recipe))
    entries = {t["name"]: t.get("report", {}) for t in report["techniques"]}
    lb = entries["large_batch"]
    assert lb["gradient_accumulation_steps"] == 4 and lb["batch_size"] == 16
    assert lb["learning_rate"] == pytest.approx(2e-2)  # 1e-2 x sqrt(16 / 4)
    assert lb["warmup_steps"] == 2  # 8 steps x 4 samples = 32 samples = 2 steps of 16
    assert entries["lamb"]["optimizer"] == "Lamb" and entries["lamb"]["tensors_adapted"] > 0
    assert report["steps"] == 2 and all(math.isfinite(loss) for _, loss in report["loss_history"])


def test_technique_contract():
    assert get_technique("large_batch") is LargeBatchTechnique
    assert LargeBatchTechnique.order > ORDER_DEFAULT  # after lion / lamb / optimizer (order 500)
    assert "1706.02677" in LargeBatchTechnique.paper and "1904.00962" in LargeBatchTechnique.paper
    for name, field in LargeBatchConfig.model_fields.items():
        assert name == "name" or field.description
