"""bf16 mixed precision (Micikevicius et al. 2018, arXiv 1710.03740): bf16 compute, fp32 master weights."""

from __future__ import annotations

import pytest
import torch

from hf_efftrain.core.build import build
from hf_efftrain.core.recipe import Recipe
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.runtime.flops import cpu_bf16_native, cpu_description
from hf_efftrain.techniques.bf16 import Bf16Config, Bf16Technique


def test_validate():
    Bf16Technique().validate(None, Env(cuda=False))
    Bf16Technique().validate(None, Env(cuda=True, bf16_supported=True))
    with pytest.raises(RecipeError, match="bf16") as err:
        Bf16Technique().validate(None, Env(cuda=True, bf16_supported=False))
    assert err.value.path == "name"


def test_training_args_set_mixed_precision(tiny):
    args = Bf16Technique(full_eval=True).training_args(tiny.args())
    assert args.bf16 and args.bf16_full_eval and not args.fp16
    assert args.mixed_precision == "bf16"  # what the Trainer hands to Accelerate


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_cpu_only_machine_gets_use_cpu(tiny):
    # TrainingArguments refuses bf16 without a bf16 accelerator unless use_cpu is set.
    args = Bf16Technique().training_args(tiny.args(use_cpu=False))
    assert args.bf16 and args.use_cpu


def test_stock_trainer_step_with_cpu_autocast(tiny):
    args = Bf16Technique().training_args(tiny.args(max_steps=2))
    model = tiny.model()
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = tiny.train(model, args)
    hook.remove()

    assert trainer.accelerator.mixed_precision == "bf16"
    assert seen and set(seen) == {torch.bfloat16}  # matmuls ran in bf16 under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    losses = tiny.losses(trainer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_contract():
    assert get_technique("bf16") is Bf16Technique
    assert "fp16" in Bf16Technique.conflicts
    assert "1710.03740" in Bf16Technique.paper
    for field_name, field in Bf16Config.model_fields.items():
        assert field_name == "name" or field.description


def test_documented_alias_of_mixed_precision():
    assert "alias of mixed_precision dtype: bf16" in Bf16Technique.survey_section
    assert "Alias of ``mixed_precision`` with ``dtype: bf16``" in Bf16Technique.__doc__
    assert Bf16Technique().settings.dtype == "bf16" and Bf16Technique().only_training_args()


EMULATED = Env(cuda=False, cpu_bf16_native=False)  # an AVX2-only x86 CPU: torch's bf16 matmul is a reference kernel


def test_emulated_cpu_bf16_warns_but_still_trains_in_bf16(tiny, caplog):
    technique = Bf16Technique()
    with caplog.at_level("WARNING", logger="hf_efftrain.techniques.mixed_precision"):
        technique.validate(None, EMULATED)
    assert "no native bf16 matmuls" in caplog.text and "only_if_native: true" in caplog.text
    assert technique.active and technique.training_args(tiny.args()).bf16


def test_only_if_native_trains_in_fp32_where_bf16_is_emulated(tiny_recipe, caplog):
    recipe = Recipe.parse(
        tiny_recipe(training={"max_steps": 2}, techniques=[{"name": "bf16", "only_if_native": True}])
    )
    with caplog.at_level("WARNING", logger="hf_efftrain.techniques.mixed_precision"):
        built = build(recipe, EMULATED)
    assert "trained in fp32" in caplog.text
    (technique,) = built.techniques
    assert technique.skipped and "no native bf16" in technique.report()["skipped"]
    assert not built.trainer.args.bf16 and built.trainer.args.mixed_precision != "bf16"
    built.trainer.train()
    assert built.trainer.accelerator.mixed_precision == "no"

    native = build(recipe, Env(cuda=False, cpu_bf16_native=True))  # the same recipe where bf16 is native
    assert native.trainer.args.bf16 and native.techniques[0].report()["skipped"] is None


def test_only_if_native_skips_pure_bf16_and_old_gpus():
    pure = get_technique("mixed_precision")(pure_bf16=True, update_rounding="kahan", only_if_native=True)
    pure.validate(None, EMULATED)
    model = torch.nn.Linear(4, 4)
    assert pure.on_model(model).weight.dtype == torch.float32 and pure.optimizer_cls_and_kwargs(None) is None
    old_gpu = Env(cuda=True, bf16_supported=False)
    Bf16Technique(only_if_native=True).validate(None, old_gpu)  # skipped, where plain bf16 is refused
    with pytest.raises(RecipeError) as err:
        get_technique("mixed_precision")(dtype="fp16", only_if_native=True).validate(None, Env(cuda=True))
    assert err.value.path == "only_if_native"


def test_env_detects_native_cpu_bf16():
    assert Env.detect().cpu_bf16_native == cpu_bf16_native()
    assert "bf16" in cpu_description() and torch.backends.cpu.get_cpu_capability() in cpu_description()


def test_only_if_native_is_refused_with_16_bit_weights(tiny_recipe):
    """model.dtype bfloat16 computes in bf16 whatever the machine: there is no fp32 run to fall back to."""
    recipe = Recipe.parse(
        tiny_recipe(model={"dtype": "bfloat16"}, techniques=[{"name": "bf16", "only_if_native": True}])
    )
    for env in (EMULATED, Env(cuda=False, cpu_bf16_native=True)):  # refused on every machine: the recipe is portable
        with pytest.raises(RecipeError, match="model.dtype bfloat16") as err:
            build(recipe, env)
        assert err.value.path == "techniques[0].only_if_native"


@pytest.mark.parametrize("techniques", [[], [{"name": "bf16"}]])
def test_bf16_weights_on_an_emulating_cpu_warn_once(tiny_recipe, caplog, techniques):
    recipe = Recipe.parse(tiny_recipe(model={"dtype": "bfloat16"}, techniques=techniques))
    with caplog.at_level("WARNING"):
        build(recipe, EMULATED)
    assert caplog.text.count("no native bf16 matmuls") == 1  # model.dtype's, or the technique's: not both
    caplog.clear()
    with caplog.at_level("WARNING"):
        build(recipe, Env(cuda=False, cpu_bf16_native=True))
    assert "no native bf16" not in caplog.text
