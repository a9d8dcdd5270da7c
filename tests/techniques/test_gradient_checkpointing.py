"""Gradient checkpointing (Chen et al. 2016, arXiv 1604.06174): recomputation changes memory, not gradients."""

from __future__ import annotations

import pytest
import torch

from hf_efftrain.registry import get_technique
from hf_efftrain.techniques.gradient_checkpointing import (
    GradientCheckpointingConfig,
    GradientCheckpointingTechnique,
    enable_gradient_checkpointing,
)


def test_training_args(tiny):
    args = GradientCheckpointingTechnique(use_reentrant=True).training_args(tiny.args())
    assert args.activation_checkpointing is True
    assert args.gradient_checkpointing is True  # the deprecated alias mirrors the new name
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}

    args = GradientCheckpointingTechnique(every_n_layers=2).training_args(
        tiny.args(activation_checkpointing_kwargs={"preserve_rng_state": False})
    )
    assert args.activation_checkpointing_kwargs == {
        "preserve_rng_state": False,
        "use_reentrant": False,
        "every_n_layers": 2,
    }


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_same_gradients_by_hand(tiny, use_reentrant):
    batch = {k: torch.stack([r[k] for r in tiny.rows(4)]) for k in ("input_ids", "labels")}
    grads = []
    for checkpointing in (False, True):
        model = tiny.model(seed=0)
        if checkpointing:
            enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
            assert model.is_activation_checkpointing
        model.train()
        model(**batch).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_stock_trainer_step_equals_no_checkpointing(tiny):
    params = []
    for technique in (None, GradientCheckpointingTechnique()):
        args = tiny.args(max_steps=1, per_device_train_batch_size=4, lr_scheduler_type="constant")
        if technique is not None:
            args = technique.training_args(args)
        model = tiny.model(seed=0)
        # lr=1: one plain SGD step moves each parameter by exactly minus its gradient.
        tiny.train(model, args, tiny.rows(4), optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1.0}))
        if technique is not None:
            assert model.is_activation_checkpointing
            assert model.is_gradient_checkpointing
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        else:
            assert not model.is_activation_checkpointing
        params.append([p.detach() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_every_n_layers(tiny):
    model = enable_gradient_checkpointing(tiny.model(), every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]


def test_config_and_contract():
    with pytest.raises(ValueError):
        GradientCheckpointingConfig(every_n_layers=0)
    assert get_technique("gradient_checkpointing") is GradientCheckpointingTechnique
    assert "1604.06174" in GradientCheckpointingTechnique.paper
    for field_name, field in GradientCheckpointingConfig.model_fields.items():
        assert field_name == "name" or field.description
