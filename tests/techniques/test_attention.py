"""The attention technique: attn_implementation at model build, sdpa == eager numerically, recipe errors."""

from __future__ import annotations

from types import SimpleNamespace

import pydantic
import pytest
import torch

from hf_efftrain.errors import MissingDependencyError, RecipeError
from hf_efftrain.registry import get_technique
from hf_efftrain.technique import Env
from hf_efftrain.techniques.attention import AttentionConfig, AttentionTechnique


def _recipe(attn_implementation=None):
    return SimpleNamespace(model=SimpleNamespace(attn_implementation=attn_implementation))


def _model(tiny, implementation: str):
    kwargs = AttentionTechnique(implementation=implementation).model_kwargs({"dtype": torch.float32})
    assert kwargs == {"dtype": torch.float32, "attn_implementation": implementation}
    model = tiny.model(seed=0, **kwargs)
    assert model.config._attn_implementation == implementation
    return model


def test_sdpa_and_eager_agree_on_logits_and_grads(tiny):
    input_ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding in the second row exercises the mask path
    # Fully masked (pad) query rows are implementation-defined: no loss on them, nor on the token they predict.
    labels = input_ids.clone()
    labels[1, :5] = -100
    out = {}
    for impl in ("sdpa", "eager"):
        model = _model(tiny, impl)
        result = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        result.loss.backward()
        out[impl] = (result.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad)
    keep = attention_mask.bool()
    torch.testing.assert_close(out["sdpa"][0][keep], out["eager"][0][keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "flash_attention_4"])
def test_flash_needs_cuda_and_the_package(impl):
    with pytest.raises(RecipeError, match="CUDA") as err:
        AttentionTechnique(implementation=impl).validate(_recipe(), Env(cuda=False))
    assert err.value.path == "implementation"
    with pytest.raises(MissingDependencyError) as err:
        AttentionTechnique(implementation=impl).validate(_recipe(), Env(cuda=True))
    assert err.value.path == "implementation" and "flash_attn" in err.value.message
    package = "flash_attn_interface" if impl == "flash_attention_3" else "flash_attn"
    AttentionTechnique(implementation=impl).validate(_recipe(), Env(cuda=True, installed=frozenset({package})))


def test_flex_attention_needs_cuda_for_training():
    with pytest.raises(RecipeError, match="backward"):
        AttentionTechnique(implementation="flex_attention").validate(_recipe(), Env(cuda=False))
    AttentionTechnique(implementation="flex_attention").validate(_recipe(), Env(cuda=True))


def test_conflict_with_model_attn_implementation():
    tech = AttentionTechnique(implementation="sdpa")
    tech.validate(_recipe(None), Env())
    tech.validate(_recipe("sdpa"), Env())
    with pytest.raises(RecipeError, match="model.attn_implementation='eager'") as err:
        tech.validate(_recipe("eager"), Env())
    assert err.value.path == "implementation"


def test_config_and_contract():
    with pytest.raises(pydantic.ValidationError):
        AttentionConfig(implementation="flash")
    assert AttentionConfig().implementation == "sdpa"
    assert get_technique("attention") is AttentionTechnique
    assert "2205.14135" in AttentionTechnique.paper
    for field_name, field in AttentionConfig.model_fields.items():
        assert field_name == "name" or field.description
