"""2:4 sparse tensor-core kernels for a 2:4-trained model (NVIDIA's semi-structured sparsity; Mishra et al. 2021,
"Accelerating Sparse Deep Neural Networks", arXiv 2104.08378).

On CUDA, ``to_semi_structured(modules, masks)`` swaps the masked weights for ``torch.sparse.to_sparse_semi_structured``
tensors (the sparse tensor-core matmul, for inference of a 2:4-trained model); on a CPU 2:4 is masking only.
"""

from __future__ import annotations

import torch
from torch import nn


class SemiStructured:
    """Handle returned by ``to_semi_structured``; ``undo()`` puts the dense weights back."""

    def __init__(self, originals: dict[nn.Module, nn.Parameter]):
        self.originals = originals

    def undo(self) -> None:
        for module, weight in self.originals.items():
            module.weight = weight
        self.originals = {}


def to_semi_structured(modules: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> SemiStructured:
    """Swap each masked ``nn.Linear`` weight for a ``torch.sparse`` semi-structured (2:4) tensor: the sparse
    tensor-core matmul (Ampere+ CUDA GPUs, fp16/bf16 weights). Frozen weights: for inference of a 2:4-trained model."""
    from torch.sparse import to_sparse_semi_structured

    originals: dict[nn.Module, nn.Parameter] = {}
    for name, m in modules.items():
        w = m.weight
        if not isinstance(m, nn.Linear) or w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"{name}: 2:4 kernels need an nn.Linear with a CUDA fp16/bf16 weight ({w.device}, {w.dtype})"
            )
        sparse = to_sparse_semi_structured(w.detach() * masks[name])
        originals[m] = w
        m.weight = nn.Parameter(sparse, requires_grad=False)
    return SemiStructured(originals)
