"""Activation offloading: move the tensors saved for backward to host memory, bring them back for the backward pass.

Rhu et al., "vDNN: Virtualized Deep Neural Networks for Scalable, Memory-Efficient Neural Network Design",
MICRO 2016, arXiv 1602.08124 (survey Sec. "Memory efficiency", offloading): activations are the bulk of training
memory and sit idle between their forward use and the backward pass, so they can wait in host memory. The copies go
out on a side CUDA stream into pinned buffers (non-blocking, overlapping the next layers' compute), and come back on
the compute stream when autograd unpacks them. Tensors under ``min_bytes`` stay on the device (moving them costs more
than it frees), and so do tensors that share storage with a parameter (weights saved by matmuls stay resident
anyway).

Built on ``torch.autograd.graph.saved_tensors_hooks`` (``torch.autograd.graph.save_on_cpu`` offloads every saved
tensor, with no size threshold and no side stream, hence this class). The hooks are installed around the model's
forward pass (through ``patching.patch_attr``); the backward pass needs no hook, as each saved tensor carries its
unpack function. On a machine without an accelerator there is nothing to offload: the technique warns once and does
nothing.

Functional core: ``handle = offload_activations(model, min_bytes=1 << 20)`` before ``Trainer(...)``; ``handle.undo()``.
``ActivationOffloader(...).hooks()`` is the plain context manager for a hand-written loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from ..core.patching import Patches, patch_attr
from ..core.registry import register_technique
from ..core.technique import ORDER_WRAPPER, Technique, TechniqueConfig

logger = logging.getLogger(__name__)


@dataclass
class _Offloaded:
    device: torch.device
    host: torch.Tensor
    copied: Any = None  # CUDA event recorded after the device-to-host copy, or None


class ActivationOffloader:
    """Pack/unpack hooks that keep saved tensors of ``device_type`` above ``min_bytes`` on the host.

    ``device_type``: which tensors to offload; None means the CUDA device when there is one (nothing otherwise).
    ``"cpu"`` forces the hooks on for CPU tensors (a copy into a fresh host buffer), which lets tests check the round
    trip without a GPU. Counters: ``packed`` / ``packed_bytes`` (offloaded), ``kept`` (left where they were).
    """

    def __init__(
        self,
        min_bytes: int = 1 << 20,
        device_type: str | None = None,
        pin_memory: bool = True,
        side_stream: bool = True,
    ):
        self.min_bytes = min_bytes
        self.device_type = device_type or ("cuda" if torch.cuda.is_available() else None)
        on_cuda = self.device_type == "cuda"
        self.pin_memory = pin_memory and on_cuda
        self.side_stream = side_stream and on_cuda
        self._stream: Any = None
        self._param_storages: set[int] = set()
        self.packed = self.packed_bytes = self.kept = 0

    @property
    def active(self) -> bool:
        return self.device_type is not None

    def exclude(self, params: Iterable[torch.Tensor]) -> None:
        """Never offload tensors that share storage with these (the model's parameters)."""
        self._param_storages = {p.untyped_storage().data_ptr() for p in params}

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def _offloads(self, t: torch.Tensor) -> bool:
        return (
            t.device.type == self.device_type
            and t.layout == torch.strided
            and t.numel() * t.element_size() >= self.min_bytes
            and t.untyped_storage().data_ptr() not in self._param_storages
        )

    def pack(self, t: torch.Tensor) -> Any:
        if not self._offloads(t):
            self.kept += 1
            return t.detach()  # same storage; returning t itself would make a reference cycle (torch's docs)
        self.packed += 1
        self.packed_bytes += t.numel() * t.element_size()
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=self.pin_memory)
        if not self.side_stream:
            host.copy_(t, non_blocking=self.pin_memory)
            return _Offloaded(t.device, host)
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        self._stream.wait_stream(torch.cuda.current_stream(t.device))  # t must be computed before it is copied
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        t.record_stream(self._stream)  # the allocator must not reuse t's memory until the copy is done
        return _Offloaded(t.device, host, copied)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.copied is not None:
            torch.cuda.current_stream(packed.device).wait_event(packed.copied)
        return packed.host.to(packed.device, non_blocking=self.pin_memory)


def offload_activations(
    model: torch.nn.Module,
    min_bytes: int = 1 << 20,
    pin_memory: bool = True,
    side_stream: bool = True,
    device_type: str | None = None,
    offloader: ActivationOffloader | None = None,
) -> Patches:
    """Wrap ``model.forward`` so that training forward passes save their large activations on the host.

    Returns the undo handle (empty, after one warning, when there is no accelerator and ``device_type`` is None).
    """
    off = offloader or ActivationOffloader(min_bytes, device_type, pin_memory, side_stream)
    patches = Patches()
    if not off.active:
        logger.warning("activation_offload: no CUDA device, activations already live in host memory; doing nothing")
        return patches
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if model.training and torch.is_grad_enabled():
            off.exclude(model.parameters())  # here, not once: the Trainer moves the model to its device later
            with off.hooks():
                return original(*args, **kwargs)
        return original(*args, **kwargs)

    patches.add(patch_attr(model, "forward", forward))
    return patches


class ActivationOffloadConfig(TechniqueConfig):
    name: Literal["activation_offload"] = "activation_offload"
    min_bytes: int = Field(
        1 << 20, ge=0, description="Offload only saved tensors of at least this many bytes; smaller ones stay."
    )
    pin_memory: bool = Field(True, description="Copy into pinned host buffers (needed for asynchronous copies).")
    side_stream: bool = Field(True, description="Run device-to-host copies on a separate CUDA stream.")


@register_technique
class ActivationOffloadTechnique(Technique):
    """Patches the model's forward in ``on_model`` (order: wrapper band, after adapters)."""

    name = "activation_offload"
    Config = ActivationOffloadConfig
    survey_section = "Memory efficiency / Offloading"
    paper = (
        'Rhu et al. 2016, "vDNN: Virtualized Deep Neural Networks for Scalable, Memory-Efficient Neural Network '
        'Design", arXiv 1602.08124'
    )
    order = ORDER_WRAPPER

    config: ActivationOffloadConfig

    @classmethod
    def status(cls) -> str:
        return "ready" if torch.cuda.is_available() else "no-op without CUDA"

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        c = self.config
        self.offloader = ActivationOffloader(c.min_bytes, None, c.pin_memory, c.side_stream)
        self.patches = Patches()

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.patches = offload_activations(model, offloader=self.offloader)
        return model

    def report(self) -> dict[str, Any]:
        off = self.offloader
        return {"active": off.active, "tensors_offloaded": off.packed, "bytes_offloaded": off.packed_bytes}
