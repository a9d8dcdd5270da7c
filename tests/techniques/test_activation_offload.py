"""Activation offloading (Rhu et al. 2016, vDNN, arXiv 1602.08124): saved tensors wait in host memory; gradients
must not change."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_efftrain.core.registry import get_technique
from hf_efftrain.techniques.activation_offload import (
    ActivationOffloadConfig,
    ActivationOffloader,
    ActivationOffloadTechnique,
    offload_activations,
)


def _batch(tiny, n: int = 4, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in tiny.rows(n)]).to(device) for k in ("input_ids", "labels")}


def _grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_forced_round_trip_gives_identical_gradients(tiny):
    batch = _batch(tiny)
    expected = _grads(tiny.model(seed=0), batch)

    model = tiny.model(seed=0)
    min_bytes = 4 * 16 * 64 * 4  # one hidden-state tensor of this batch (4 x 16 tokens x 64 floats)
    off = ActivationOffloader(min_bytes=min_bytes, device_type="cpu")  # forced on: copies into fresh host buffers
    handle = offload_activations(model, offloader=off)
    got = _grads(model, batch)

    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert off.packed > 0 and off.kept > 0  # large activations went out, small ones and weights stayed
    assert off.packed_bytes >= off.packed * min_bytes

    packed = off.packed
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert off.packed == packed  # evaluation and no-grad passes save nothing

    handle.undo()
    assert "forward" not in vars(model)  # the class's forward shows again
    _grads(model, batch)
    assert off.packed == packed


def test_threshold_and_parameters_are_respected():
    weight = torch.nn.Parameter(torch.randn(256, 256))
    off = ActivationOffloader(min_bytes=1024, device_type="cpu")
    off.exclude([weight])
    big, small, weight_t = torch.randn(256, 256), torch.randn(8), weight.t()
    assert off.pack(weight_t).data_ptr() == weight.data_ptr() and off.packed == 0  # shares the weight's storage
    assert off.pack(small).data_ptr() == small.data_ptr() and off.packed == 0  # under min_bytes: kept in place
    packed = off.pack(big)
    assert off.packed == 1 and off.packed_bytes == big.numel() * 4
    restored = off.unpack(packed)
    assert restored is not big and restored.data_ptr() != big.data_ptr() and torch.equal(restored, big)

    x = torch.randn(64, 64, requires_grad=True)
    with ActivationOffloader(min_bytes=1 << 30, device_type="cpu").hooks():
        y = (x * x).sum()
    y.backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_is_a_noop_with_one_warning(tiny, caplog):
    args = tiny.args(max_steps=3)
    plain = tiny.losses(tiny.train(tiny.model(seed=0), args))

    technique = ActivationOffloadTechnique()
    model = tiny.model(seed=0)
    with caplog.at_level(logging.WARNING, logger="hf_efftrain.techniques.activation_offload"):
        technique.on_model(model)
        trainer = tiny.train(model, args)
    warnings = [r for r in caplog.records if "activation_offload" in r.getMessage()]
    assert len(warnings) == 1 and "no CUDA device" in warnings[0].getMessage()
    assert "forward" not in vars(model)  # nothing patched
    assert tiny.losses(trainer) == plain
    assert technique.report() == {"active": False, "tensors_offloaded": 0, "bytes_offloaded": 0}


def test_contract():
    assert get_technique("activation_offload") is ActivationOffloadTechnique
    assert "1602.08124" in ActivationOffloadTechnique.paper
    with pytest.raises(ValueError):
        ActivationOffloadConfig(min_bytes=-1)
    for field_name, field in ActivationOffloadConfig.model_fields.items():
        assert field_name == "name" or field.description


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_drops_and_gradients_match(tiny):
    config = tiny.config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    rows = tiny.rows(16, seq_len=64)
    batch = {k: torch.stack([r[k] for r in rows]).cuda() for k in ("input_ids", "labels")}
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = type(tiny.model())._from_config(config).cuda()
        off = ActivationOffloader(min_bytes=64 * 1024)
        if offload:
            offload_activations(model, offloader=off)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        grads = _grads(model, batch)
        torch.cuda.synchronize()
        results.append((torch.cuda.max_memory_allocated() - start, grads, off.packed))
    (peak_plain, grads_plain, _), (peak_off, grads_off, packed) = results
    assert packed > 0
    assert peak_off < 0.8 * peak_plain
    for a, b in zip(grads_off, grads_plain):  # bitwise on the CPU; CUDA attention kernels may reorder sums
        torch.testing.assert_close(a, b)
