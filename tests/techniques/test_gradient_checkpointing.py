"""Gradient checkpointing (Chen et al. 2016, arXiv 1604.06174): recomputation changes memory, not gradients."""

from __future__ import annotations

import pytest
import torch

from hf_efftrain.core.registry import get_technique
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


def _mlp_calls_per_layer(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[int]:
    """How often each decoder layer's MLP started in one forward + backward: 2 where the backward recomputed it.
    (A pre-hook: non-reentrant recomputation stops early, once the last tensor it needs is recomputed.)"""
    calls = [0] * len(model.model.layers)
    handles = [
        layer.mlp.register_forward_pre_hook(lambda m, i, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, layer in enumerate(model.model.layers)
    ]
    model.train()
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    return calls


def test_every_n_layers_recomputes_only_every_nth_layer(tiny):
    # transformers 5 honours every_n_layers (PreTrainedModel._set_gradient_checkpointing: layer_index % n == 0).
    batch = {k: torch.stack([r[k] for r in tiny.rows(4)]) for k in ("input_ids", "labels")}

    def model(every_n_layers: int | None):
        torch.manual_seed(0)
        m = type(tiny.model())._from_config(tiny.config(num_hidden_layers=4))
        return m if every_n_layers is None else enable_gradient_checkpointing(m, every_n_layers=every_n_layers)

    assert _mlp_calls_per_layer(model(None), batch) == [1, 1, 1, 1]
    assert _mlp_calls_per_layer(model(1), batch) == [2, 2, 2, 2]
    assert _mlp_calls_per_layer(model(2), batch) == [2, 1, 2, 1]
    assert _mlp_calls_per_layer(model(3), batch) == [2, 1, 1, 2]

    # The same through the stock Trainer, from the technique's TrainingArguments.
    m = model(None)
    args = GradientCheckpointingTechnique(every_n_layers=2).training_args(tiny.args(max_steps=1))
    calls = [0] * 4
    for k, layer in enumerate(m.model.layers):
        layer.mlp.register_forward_pre_hook(lambda mod, i, k=k: calls.__setitem__(k, calls[k] + 1))
    tiny.train(m, args)
    assert [layer.gradient_checkpointing for layer in m.model.layers] == [True, False, True, False]
    assert calls == [2, 1, 2, 1]


def _peak_cpu_tensor_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Peak bytes of live CPU tensors during forward + backward, from the profiler's allocation timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline  # the data behind export_memory_timeline

    model.train()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model(**batch).loss.backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max(sum(s) for s in sizes)


def test_every_n_layers_peak_memory_lies_between_none_and_full(tiny):
    config = tiny.config(num_hidden_layers=4, hidden_size=128, intermediate_size=256)
    batch = {k: torch.stack([r[k] for r in tiny.rows(8, seq_len=64)]) for k in ("input_ids", "labels")}
    peaks = {}
    for every_n_layers in (None, 2, 1):
        torch.manual_seed(0)
        model = type(tiny.model())._from_config(config)
        if every_n_layers is not None:
            enable_gradient_checkpointing(model, every_n_layers=every_n_layers)
        peaks[every_n_layers] = _peak_cpu_tensor_bytes(model, batch)
    assert peaks[None] > peaks[2] > peaks[1]
    # Half the layers keep their activations: the saving is about half of full checkpointing's.
    saved_half, saved_full = peaks[None] - peaks[2], peaks[None] - peaks[1]
    assert 0.3 < saved_half / saved_full < 0.7
