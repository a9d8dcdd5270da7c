"""Every technique module, imported by name so that each registers itself (see registry.py)."""

from . import attention, bf16, fp16, gradient_checkpointing, lion, optimizer  # noqa: F401
