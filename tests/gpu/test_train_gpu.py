"""On CUDA: a recipe trains on the GPU with bf16 and the report uses CUDA memory and a known GPU peak."""

from __future__ import annotations

import pytest
import torch

from hf_efftrain import Recipe, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_lion_recipe_on_gpu(tiny_recipe):
    report = train(
        Recipe.parse(
            tiny_recipe(
                training={"max_steps": 30},
                techniques=[{"name": "lion", "lr": 1e-3}, {"name": "bf16"}],
            )
        )
    )
    assert report["train_loss_final"] < 0.85 * report["train_loss_first"]
    assert report["peak_memory_bytes"]["cuda"] > 0
    assert report["compute_dtype"] == "bfloat16"
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("H100", "H200", "A100")):
        assert report["peak_flops_source"].startswith("known:")
