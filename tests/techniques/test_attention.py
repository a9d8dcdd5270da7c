"""Attention: ``model.attn_implementation`` is the one switch, checked against what the installed transformers
accepts; the ``attention`` technique is its alias. sdpa == eager numerically."""

from __future__ import annotations

import pydantic
import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_efftrain import Recipe, RecipeError
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.recipe_checks import attn_implementation_problem, attn_implementations, check_attention_env
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import MissingDependencyError
from hf_efftrain.techniques.attention import AttentionConfig, AttentionTechnique


def _parse(tiny_recipe, impl=None, techniques=()):
    model = {"attn_implementation": impl} if impl is not None else {}
    return Recipe.parse(tiny_recipe(model=model, techniques=list(techniques)))


def test_sdpa_and_eager_agree_on_logits_and_grads(tiny):
    input_ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding in the second row exercises the mask path
    # Fully masked (pad) query rows are implementation-defined: no loss on them, nor on the token they predict.
    labels = input_ids.clone()
    labels[1, :5] = -100
    out = {}
    for impl in ("sdpa", "eager"):
        model = tiny.model(seed=0, attn_implementation=impl, dtype=torch.float32)
        assert model.config._attn_implementation == impl
        result = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        result.loss.backward()
        out[impl] = (result.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad)
    keep = attention_mask.bool()
    torch.testing.assert_close(out["sdpa"][0][keep], out["eager"][0][keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], rtol=1e-4, atol=1e-6)


def test_names_come_from_transformers_at_run_time(tiny_recipe):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert set(attn_implementations()) == {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    for impl in ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged|eager",
                 "paged|sdpa"):  # fmt: skip
        assert _parse(tiny_recipe, impl).model.attn_implementation == impl
    with pytest.raises(RecipeError, match="unknown attention implementation 'my_attn'"):
        _parse(tiny_recipe, "my_attn")
    AttentionInterface.register("my_attn", sdpa_attention_forward)
    try:
        assert "my_attn" in attn_implementations()
        assert _parse(tiny_recipe, "my_attn").model.attn_implementation == "my_attn"
        assert _parse(tiny_recipe, "paged|my_attn").model.attn_implementation == "paged|my_attn"
        assert AttentionConfig(implementation="my_attn").implementation == "my_attn"
    finally:
        del AttentionInterface._global_mapping["my_attn"]
    assert "my_attn" not in attn_implementations()


@pytest.mark.parametrize("bad", ["flash", "sdpa ", "paged|", "FLASH_ATTENTION_2", "a/b/c"])
def test_unknown_name_is_a_recipe_error_listing_the_allowed_ones(tiny_recipe, bad):
    with pytest.raises(RecipeError) as err:
        _parse(tiny_recipe, bad)
    text = str(err.value)
    assert len(text.splitlines()) == 1 and text.startswith("model.attn_implementation: unknown attention")
    assert "allowed: eager," in text and all(name in text for name in attn_implementations())
    assert "org/repo" in text  # hub kernels are named as a form
    with pytest.raises(RecipeError) as err:
        _parse(tiny_recipe, techniques=[{"name": "attention", "implementation": bad}])
    assert str(err.value).startswith("techniques[0].implementation: unknown attention implementation")


@pytest.mark.parametrize(
    "kernel", ["kernels-community/flash-attn", "kernels-community/flash-attn@v2:flash_attn_varlen_func", "paged|a/b"]
)
def test_hub_kernels_are_accepted_with_the_kernels_package(tiny_recipe, monkeypatch, kernel):
    # Validation only: nothing is fetched (offline); transformers loads the kernel when the model is built.
    monkeypatch.setattr(transformers.utils, "is_kernels_available", lambda: False)
    with pytest.raises(RecipeError, match="needs the 'kernels' package: pip install kernels") as err:
        _parse(tiny_recipe, kernel)
    assert str(err.value).startswith("model.attn_implementation: ")
    monkeypatch.setattr(transformers.utils, "is_kernels_available", lambda: True)
    assert attn_implementation_problem(kernel) is None
    recipe = _parse(tiny_recipe, kernel)
    assert recipe.model.attn_implementation == kernel
    make_techniques(recipe, Env())  # no CUDA or package check of our own: the kernel brings its own builds


@pytest.mark.parametrize(
    "impl", ["flash_attention_2", "flash_attention_3", "flash_attention_4", "paged|flash_attention_2"]
)
def test_flash_needs_cuda_and_the_package(tiny_recipe, impl):
    recipe = _parse(tiny_recipe, impl)
    with pytest.raises(RecipeError, match="CUDA") as err:
        make_techniques(recipe, Env(cuda=False))
    assert err.value.path == "model.attn_implementation"
    with pytest.raises(MissingDependencyError) as err:
        make_techniques(recipe, Env(cuda=True))
    assert err.value.path == "model.attn_implementation" and "flash_attn" in err.value.message
    package = "flash_attn_interface" if impl == "flash_attention_3" else "flash_attn"
    make_techniques(recipe, Env(cuda=True, installed=frozenset({package})))


def test_flex_attention_needs_cuda_for_training():
    with pytest.raises(RecipeError, match="backward"):
        check_attention_env("flex_attention", Env(cuda=False))
    check_attention_env("flex_attention", Env(cuda=True))
    check_attention_env(None, Env(cuda=False))  # transformers' default (sdpa)


def test_technique_is_an_alias_of_the_model_field(tiny_recipe):
    recipe = _parse(tiny_recipe, techniques=[{"name": "attention", "implementation": "eager"}])
    assert recipe.model.attn_implementation == "eager"  # the one place every hook reads
    assert Recipe.parse(recipe.to_dict()) == recipe  # the saved recipe reads back
    assert _parse(tiny_recipe, techniques=[{"name": "attention"}]).model.attn_implementation == "sdpa"
    assert _parse(tiny_recipe, "eager", [{"name": "attention", "implementation": "eager"}]).model.attn_implementation
    with pytest.raises(RecipeError) as err:
        _parse(tiny_recipe, "sdpa", [{"name": "lion"}, {"name": "attention", "implementation": "eager"}])
    assert str(err.value) == (
        "techniques[1].implementation: 'eager' but model.attn_implementation is 'sdpa'; attention is an alias of "
        "model.attn_implementation: set only that"
    )
    # The alias reaches the checks of the field (here: flash needs CUDA).
    alias = _parse(tiny_recipe, techniques=[{"name": "attention", "implementation": "flash_attention_2"}])
    with pytest.raises(RecipeError, match=r"^model\.attn_implementation: flash_attention_2 runs"):
        make_techniques(alias, Env(cuda=False))


@pytest.mark.parametrize("how", ["field", "alias"])
def test_trains_end_to_end_with_the_chosen_kernel(tiny_recipe, how):
    sections = {"training": {"max_steps": 2}}
    if how == "field":
        sections["model"] = {"attn_implementation": "eager"}
    else:
        sections["techniques"] = [{"name": "attention", "implementation": "eager"}]
    built = build(Recipe.parse(tiny_recipe(**sections)), Env())
    assert built.model.config._attn_implementation == "eager"
    built.trainer.train()
    losses = [e["loss"] for e in built.trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_config_and_contract():
    with pytest.raises(pydantic.ValidationError, match="allowed: eager"):
        AttentionConfig(implementation="flash")
    assert AttentionConfig().implementation == "sdpa"
    assert get_technique("attention") is AttentionTechnique
    assert "2205.14135" in AttentionTechnique.paper
    assert "alias of model.attn_implementation" in AttentionTechnique.survey_section
    assert AttentionConfig.model_alias == {"implementation": "attn_implementation"}
    for field_name, field in AttentionConfig.model_fields.items():
        assert field_name == "name" or field.description
