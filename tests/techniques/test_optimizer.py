"""The optimizer technique: torch classes through optimizer_cls_and_kwargs, Trainer names through
TrainingArguments.optim, and the recipe errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers.training_args import OptimizerNames

from hf_efftrain import Recipe
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import MissingDependencyError, RecipeError
from hf_efftrain.techniques.optimizer import (
    BNB_OPTIMIZERS,
    OptimizerConfig,
    OptimizerTechnique,
    optim_args_string,
)


@pytest.mark.parametrize(
    "type_, fields, expected",
    [
        ("sgd", {"momentum": 0.9, "args": {"nesterov": True}}, {"momentum": 0.9, "nesterov": True}),
        ("adam", {"betas": (0.8, 0.95), "eps": 1e-6}, {"betas": (0.8, 0.95), "eps": 1e-6}),
        ("adamw", {}, {"betas": (0.9, 0.999), "eps": 1e-8}),  # defaults from TrainingArguments.adam_*
    ],
)
def test_torch_optimizers_train_with_stock_trainer(tiny, type_, fields, expected):
    tech = OptimizerTechnique(type=type_, lr=5e-3, weight_decay=0.01, **fields)
    tech.validate(None, Env())
    args = tech.training_args(tiny.args(max_steps=3))
    assert args.learning_rate == 5e-3 and args.weight_decay == 0.01

    model = tiny.model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = tiny.train(model, args, optimizer_cls_and_kwargs=tech.optimizer_cls_and_kwargs(args))

    opt = trainer.optimizer.optimizer
    assert type(opt) is {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[type_]
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    for group in opt.param_groups:
        assert group["initial_lr"] == 5e-3
        for key, value in expected.items():
            assert group[key] == value, key
    assert all(torch.isfinite(torch.tensor(tiny.losses(trainer))))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_trainer_name_with_optim_args(tiny):
    # adagrad is a torch optimizer the Trainer builds by name and configures from optim_args.
    tech = OptimizerTechnique(type="adagrad", lr=1e-2, args={"lr_decay": 0.25})
    tech.validate(None, Env())
    args = tech.training_args(tiny.args(max_steps=2))
    assert args.optim == OptimizerNames.ADAGRAD and args.optim_args == "lr_decay=0.25"
    assert tech.optimizer_cls_and_kwargs(args) is None
    trainer = tiny.train(tiny.model(), args)
    opt = trainer.optimizer.optimizer
    assert type(opt) is torch.optim.Adagrad
    assert all(g["lr_decay"] == 0.25 and g["initial_lr"] == 1e-2 for g in opt.param_groups)


def test_adamw_bnb_8bit_through_training_arguments(tiny):
    bnb = pytest.importorskip("bitsandbytes")
    tech = OptimizerTechnique(type="adamw_bnb_8bit", betas=(0.85, 0.98))
    tech.validate(None, Env(installed=frozenset({"bitsandbytes"})))
    args = tech.training_args(tiny.args(max_steps=3))
    assert args.optim == OptimizerNames.ADAMW_BNB and (args.adam_beta1, args.adam_beta2) == (0.85, 0.98)
    assert tech.optimizer_cls_and_kwargs(args) is None

    trainer = tiny.train(tiny.model(), args)
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, bnb.optim.AdamW)
    assert all(g["betas"] == (0.85, 0.98) for g in opt.param_groups)
    # 8-bit state: the large non-embedding matrices keep uint8 moments.
    state_dtypes = {t.dtype for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
    assert torch.uint8 in state_dtypes
    assert all(torch.isfinite(torch.tensor(tiny.losses(trainer))))


def test_unknown_type_lists_allowed():
    with pytest.raises(RecipeError) as err:
        OptimizerTechnique(type="adamm").validate(None, Env())
    assert err.value.path == "type"
    assert "allowed: sgd, adam, adamw" in err.value.message
    assert "adamw_bnb_8bit" in err.value.message and "adafactor" in err.value.message
    assert "lion" not in err.value.message  # Lion is the lion technique


@pytest.mark.parametrize(
    "optim, entry",
    [
        ("lion_32bit", "{name: lion}"),
        ("lion_8bit", "{name: lion, bits: 8}"),
        ("paged_lion_32bit", "{name: lion, paged: true}"),
        ("paged_lion_8bit", "{name: lion, bits: 8, paged: true}"),
    ],
)
def test_lion_names_are_refused_for_the_lion_technique(tiny_recipe, optim, entry):
    assert {n.value for n in OptimizerNames if "lion" in n.value} == {
        "lion_32bit", "lion_8bit", "paged_lion_32bit", "paged_lion_8bit"
    }  # fmt: skip
    techniques = [{"name": "bf16"}, {"name": "optimizer", "type": optim}]
    with pytest.raises(RecipeError) as err:
        Recipe.parse(tiny_recipe(techniques=techniques))
    assert str(err.value) == f"techniques[1].type: {optim} is Lion, which is the lion technique: write {entry} instead"
    # What it says to write parses, and is the same optimizer (bitsandbytes' Lion for bits 8 / paged).
    lion = Recipe.parse(tiny_recipe(techniques=[yaml.safe_load(entry)])).techniques[0]
    assert (lion.bits, lion.paged) == (8 if "8bit" in optim else 32, optim.startswith("paged_"))


def test_bnb_missing_is_a_dependency_error():
    with pytest.raises(MissingDependencyError) as err:
        OptimizerTechnique(type="paged_adamw_8bit").validate(None, Env(installed=frozenset()))
    assert err.value.path == "type" and "bitsandbytes" in err.value.message and "[bnb]" in err.value.message


@pytest.mark.parametrize(
    "fields, path",
    [
        ({"type": "adamw", "momentum": 0.9}, "momentum"),
        ({"type": "sgd", "betas": (0.9, 0.99)}, "betas"),
        ({"type": "adamw", "args": {"lr": 1.0}}, "args.lr"),
        ({"type": "adamw", "args": {"nesterov": True}}, "args.nesterov"),
        ({"type": "adafactor", "args": {"a": "1,b=2"}}, "args.a"),
    ],
)
def test_field_errors(fields, path):
    with pytest.raises(RecipeError) as err:
        OptimizerTechnique(**fields).validate(None, Env())
    assert err.value.path == path


def test_bnb_names_match_transformers():
    from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

    assert BNB_OPTIMIZERS == {n.value for n in _BITSANDBYTES_OPTIMIZERS if "lion" not in n.value}


def test_optim_args_string_and_contract():
    assert optim_args_string({"a": 1, "b": True, "c": "float32"}) == "a=1,b=True,c=float32"
    assert get_technique("optimizer") is OptimizerTechnique
    assert "lion" in OptimizerTechnique.conflicts
    for field_name, field in OptimizerConfig.model_fields.items():
        assert field_name == "name" or field.description
