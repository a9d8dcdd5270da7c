"""Every technique module, imported by name so that each registers itself (see registry.py)."""

from . import (  # noqa: F401
    attention,
    bf16,
    data_pruning,
    fp16,
    gradient_checkpointing,
    lamb,
    large_batch,
    layer_dropping,
    layer_freezing,
    lion,
    optimizer,
    packing,
    progressive_stacking,
    selective_backprop,
    seqlen_warmup,
    sparse_training,
    token_dropping,
    token_masking,
)
