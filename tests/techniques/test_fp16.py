"""fp16 mixed precision (Micikevicius et al. 2018, arXiv 1710.03740): CUDA only, loss scaling, fp32 master weights."""

from __future__ import annotations

import pytest
import torch

from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.fp16 import Fp16Config, Fp16Technique


def test_needs_cuda():
    with pytest.raises(RecipeError) as err:
        Fp16Technique().validate(None, Env(cuda=False))
    assert err.value.path == "name"
    assert err.value.message == "fp16 mixed precision needs a CUDA GPU; use bf16 on CPU"
    Fp16Technique().validate(None, Env(cuda=True))


def test_training_args_set_mixed_precision(tiny):
    args = Fp16Technique().training_args(tiny.args())
    assert args.fp16 and not args.bf16 and not args.fp16_full_eval
    assert args.mixed_precision == "fp16"  # what the Trainer hands to Accelerate


def test_contract():
    assert get_technique("fp16") is Fp16Technique
    assert "bf16" in Fp16Technique.conflicts
    assert "1710.03740" in Fp16Technique.paper
    for field_name, field in Fp16Config.model_fields.items():
        assert field_name == "name" or field.description


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stock_trainer_step_on_cuda(tiny):
    args = Fp16Technique().training_args(tiny.args(max_steps=2, use_cpu=False))
    model = tiny.model()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = tiny.train(model, args)
    assert trainer.accelerator.mixed_precision == "fp16" and trainer.accelerator.scaler is not None
    assert seen and set(seen) == {torch.float16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(tiny.losses(trainer))))


def test_documented_alias_of_mixed_precision():
    assert "alias of mixed_precision dtype: fp16" in Fp16Technique.survey_section
    assert "Alias of ``mixed_precision`` with ``dtype: fp16``" in Fp16Technique.__doc__
    assert Fp16Technique().settings.dtype == "fp16" and Fp16Technique().only_training_args()
