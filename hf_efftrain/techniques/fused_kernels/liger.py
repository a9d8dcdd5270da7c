"""Liger Kernel on CUDA (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training",
arXiv 2410.10989): Triton kernels for RoPE, RMSNorm, SwiGLU / GeGLU, LayerNorm and the fused linear cross-entropy,
applied to a model instance by ``liger_kernel.transformers._apply_liger_kernel_to_instance``.

We do not call it ourselves: the Trainer does, from its own ``TrainingArguments`` fields ``use_liger_kernel`` and
``liger_kernel_config`` (``Trainer.train`` -> ``transformers.integrations.liger.apply_liger_kernel``), after it has
placed the model on its device and unwrapped PEFT; with ``use_liger_kernel`` its loss-only evaluation also passes
``skip_logits``. Here: whether the package is there, which model types it patches, and the kernel switches.
"""

from __future__ import annotations

import importlib.util
import math
import sys

# The switches of liger's apply_liger_kernel_to_<model_type>(...) functions (each takes the ones it has;
# _apply_liger_kernel_to_instance drops the others). cross_entropy (the unfused loss) stays off: it still needs the
# full logits, and fused_linear_cross_entropy is its memory-saving replacement (liger refuses both at once).
KERNELS = ("rope", "rms_norm", "swiglu", "geglu", "layer_norm", "fused_linear_cross_entropy")
PACKAGE = "liger_kernel"


def liger_available() -> bool:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE] is not None
    try:
        return importlib.util.find_spec(PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values liger patches (its own table)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)


def loss_chunk(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk of liger's fused linear cross-entropy: next_power_of_2(ceil(tokens / ceil(V / h)))."""
    rows = math.ceil(tokens / math.ceil(vocab / hidden))
    return 1 << max(0, rows - 1).bit_length()


def kernel_config(kernels: tuple[str, ...]) -> dict[str, bool]:
    """``TrainingArguments.liger_kernel_config``: every switch explicit (liger's defaults differ per model)."""
    return {**{k: k in kernels for k in KERNELS}, "cross_entropy": False}


def liger_forward_active(model) -> bool:
    """True when ``model.forward`` is liger's fused-linear-cross-entropy forward (instance or class patch)."""
    forward = vars(model).get("forward") or type(model).forward
    return getattr(getattr(forward, "__func__", forward), "__module__", "").startswith(PACKAGE)
