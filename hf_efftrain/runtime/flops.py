"""Peak FLOP/s of a device and MFU (PaLM appendix B, Chowdhery et al. 2022, arXiv 2204.02311): the compute side of
every run report (``metrics.py``). The FLOPs per token are counted in ``flop_count.py`` (re-exported here)."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from ..cache import cache_dir, read_json, write_json_atomic
from .flop_count import count_flops, dense_flops_per_token, model_flops_per_token  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's data sheets. More specific names first: the first
# substring of the device name that matches wins, so "H100 PCIe" is not read as an SXM part.
_KNOWN_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Measurement: grow the square matmul until one product takes _MEASURE_TARGET_S (big enough that the BLAS runs at
# full speed on every thread), then keep the best of at least _MEASURE_MIN_REPS reps inside _MEASURE_BUDGET_S: on a
# shared machine the best rep is the least disturbed one. A run that beats the cached peak triggers a new
# measurement (mfu_for_run), and the cache keeps the highest value ever measured: every measurement is a lower bound
# of the true peak.
_MEASURE_TARGET_S = 0.05
_MEASURE_BUDGET_S = 1.5
_MEASURE_MIN_REPS = 5
_MEASURE_MAX_N = {"cpu": 2048}
_MEASURE_DEFAULT_MAX_N = 8192
# A run above this fraction of a measured peak re-measures it too: a peak measured on a busy machine reads low (seen
# here: 2-thread fp32 cached at 0.99e11 under load, 1.8e11 when quiet), and a real training step seldom runs its
# matmuls at more than half the speed of one large square matmul.
_SUSPICIOUS_MFU = 0.5
_CACHE_FILE = "peak_flops-v2.json"  # v1 kept bare floats from a single short measurement; never trusted again


# ------------------------------------------------------------------------------------------------------------ MFU


def mfu(tokens_per_second: float, flops_per_token: float, peak: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all ``world_size`` devices together."""
    return float(tokens_per_second) * float(flops_per_token) / (float(peak) * max(int(world_size), 1))


# ----------------------------------------------------------------------------------------------------- peak FLOP/s


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def cpu_bf16_native() -> bool:
    """True when torch runs bf16 matmuls on this CPU through oneDNN (AVX-512 or AMX on x86, bf16 on Arm); elsewhere
    (an AVX2-only x86 CPU) it falls back to a reference kernel, seen here 70x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def cpu_description() -> str:
    """This CPU for a benchmark's notes: its model name, torch's SIMD level and whether bf16 is native."""
    native = "native bf16" if cpu_bf16_native() else "no native bf16 (bf16 matmuls are emulated)"
    return f"{_device_name(torch.device('cpu'))}, {torch.backends.cpu.get_cpu_capability()}, {native}"


def _cuda_tf32_enabled() -> bool:
    matmul = torch.backends.cuda.matmul
    return bool(getattr(matmul, "allow_tf32", False)) or getattr(matmul, "fp32_precision", "") == "tf32"


def _known_peak(name: str, dtype: torch.dtype) -> float | None:
    key = _DTYPE_KEYS.get(dtype)
    if key == "fp32" and _cuda_tf32_enabled():  # fp32 matmuls then run on TF32 tensor cores
        key = "tf32"
    for pattern, peaks in _KNOWN_PEAKS:
        if pattern in name:
            return peaks.get(key) if key else None
    return None


def _synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def _measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, int, int]:
    """Best FLOP/s of a square ``a @ b`` in ``dtype``, the size ``n`` and the reps it took (about 1.5 s)."""
    deadline = time.perf_counter() + _MEASURE_BUDGET_S
    max_n = _MEASURE_MAX_N.get(device.type, _MEASURE_DEFAULT_MAX_N)

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        return time.perf_counter() - start

    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        timed(a, b)  # warm-up: kernel selection, thread pool start, lazy init
        elapsed = timed(a, b)
        # 8x the work per doubling: only grow while the next size still fits the remaining budget.
        if elapsed >= _MEASURE_TARGET_S or n >= max_n or time.perf_counter() + 20 * elapsed > deadline:
            break
        n *= 2
    best, reps = elapsed, 1
    while reps < 200 and (reps < _MEASURE_MIN_REPS or time.perf_counter() + best <= deadline):
        best, reps = min(best, timed(a, b)), reps + 1
    return 2 * n**3 / best, n, reps


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s in one dtype: ``source`` is ``known:<device>`` (data sheet) or
    ``measured:<device>:<dtype>:<threads> threads``; ``measured_at`` (UTC, ISO 8601) only for measured ones."""

    flops: float
    source: str
    measured_at: str | None = None


def device_peak(device: torch.device | str, dtype: torch.dtype, refresh: bool = False) -> Peak:
    """Peak dense matmul FLOP/s of one device in ``dtype``.

    A known CUDA part returns its data-sheet peak (fp32 uses the TF32 peak when TF32 matmuls are enabled). Anything
    else is measured with a square matmul and cached in ``cache_dir("peak_flops-v2.json")`` per device name, dtype,
    torch version and thread count (the threads this process computes with). ``refresh`` measures again and keeps
    the higher of the two. A measured CPU number is what this machine reaches, so CPU MFU reads against an
    achievable, not a theoretical, peak.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = _device_name(device)
    if device.type == "cuda":
        known = _known_peak(name, dtype)
        if known is not None:
            return Peak(known, f"known:{name}")

    dtype_name = str(dtype).removeprefix("torch.")
    threads = torch.get_num_threads()
    source = f"measured:{name}:{dtype_name}:{threads} threads"
    key = f"{name}|{dtype_name}|torch {torch.__version__}|{threads} threads"
    path = cache_dir(_CACHE_FILE)
    entry = read_json(path).get(key)
    valid = isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0
    if valid and not refresh:
        return Peak(float(entry["flops"]), source, entry.get("measured_at"))

    value, n, reps = _measure_matmul_flops(device, dtype)
    logger.info("Measured peak %.3g FLOP/s on %s (%s, %d threads, n=%d, best of %d)", value, name, dtype_name,
                threads, n, reps)  # fmt: skip
    cached = read_json(path)  # re-read: another process may have added other keys meanwhile
    old = cached.get(key)
    if isinstance(old, dict) and isinstance(old.get("flops"), (int, float)) and old["flops"] >= value:
        return Peak(float(old["flops"]), source, old.get("measured_at"))
    measured_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cached[key] = {"flops": value, "measured_at": measured_at, "matmul_n": n, "reps": reps}
    write_json_atomic(path, cached)
    return Peak(value, source, measured_at)


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[float, str]:
    """``(peak FLOP/s, source)`` of :func:`device_peak`."""
    peak = device_peak(device, dtype)
    return peak.flops, peak.source


def mfu_for_run(
    tokens_per_second: float, flops_per_token: float, device: torch.device | str, dtype: torch.dtype, world_size: int
) -> tuple[float | None, Peak, str | None]:
    """MFU of a run, never above 1: ``(mfu or None, the peak used, a note when no MFU is given)``.

    A run whose model FLOP/s per device come above half of a measured peak suggests that measurement was low (a busy
    machine): the peak is measured again, and the higher value kept. If the run still beats it, the FLOP count
    overstates the work done, and no MFU is reported rather than a number over 100%.
    """
    peak = device_peak(device, dtype)
    achieved = float(tokens_per_second) * float(flops_per_token) / max(int(world_size), 1)
    if achieved > _SUSPICIOUS_MFU * peak.flops and peak.measured_at is not None:
        peak = device_peak(device, dtype, refresh=True)
    if achieved > peak.flops:
        return (
            None,
            peak,
            (
                f"mfu: the run's {achieved:.3g} model FLOP/s per device exceed the peak {peak.flops:.3g} "
                f"({peak.source}); the FLOP count overstates the work done, so no MFU is given"
            ),
        )
    return mfu(tokens_per_second, flops_per_token, peak.flops, world_size), peak, None
