"""What a run measured: FLOPs per token, MFU, peak memory, optimizer-state bytes, and ``run_report.json``.

Every run leaves evidence (DESIGN.md): the survey (Zhuang et al. 2023, arXiv 2302.01107) compares techniques by
compute, memory and wall-clock, so each run records throughput, model FLOPs utilisation (MFU, PaLM appendix B,
Chowdhery et al. 2022, arXiv 2204.02311), peak memory and the bytes its optimizer keeps. The loss plot and the
summary table printed by the CLI live in ``report.py`` and are re-exported here.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_efftrain.cache import cache_dir, write_json_atomic
from hf_efftrain.report import plot_loss, summary_table

if TYPE_CHECKING:
    from transformers import Trainer
    from transformers.trainer_utils import TrainOutput

logger = logging.getLogger(__name__)

__all__ = [  # plot_loss and summary_table live in report.py; re-exported so callers need one import
    "build_run_report", "loss_curve", "mfu", "model_flops_per_token", "optimizer_state_bytes", "peak_flops",
    "peak_memory", "plot_loss", "summary_table", "versions", "write_run_report",
]  # fmt: skip

REPORT_FILE = "run_report.json"

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

# Measurement: grow the square matmul until one product takes this long, then keep the best of many reps, all
# inside a fixed budget so a report costs about a second (slow dtypes such as CPU fp16 stay small).
_MEASURE_TARGET_S = 0.02
_MEASURE_BUDGET_S = 1.0
_MEASURE_MAX_N = {"cpu": 1024}
_MEASURE_DEFAULT_MAX_N = 8192

_PACKAGES = (
    "torch", "transformers", "accelerate", "datasets", "tokenizers", "peft", "deepspeed", "bitsandbytes",
    "hf_efftrain",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- FLOPs


def _config_get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _attention_shape(config: Any) -> tuple[int, int]:
    """(attention layers, d_attn = heads x head_dim) from a HF config; (0, 0) when the config does not say."""
    if hasattr(config, "get_text_config"):  # multimodal configs nest the language model's config
        config = config.get_text_config()
    heads = _config_get(config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    hidden = _config_get(config, "hidden_size", "n_embd", "d_model")
    head_dim = _config_get(config, "head_dim", "d_kv")
    if heads is None or (head_dim is None and hidden is None):
        return 0, 0
    d_attn = int(heads) * int(head_dim if head_dim is not None else int(hidden) // int(heads))

    if getattr(config, "is_encoder_decoder", False):
        encoder = _config_get(config, "encoder_layers", "num_layers", "num_hidden_layers")
        decoder = _config_get(config, "decoder_layers", "num_decoder_layers") or encoder
        # Each decoder layer has self-attention and cross-attention over the encoder output.
        return int(encoder or 0) + 2 * int(decoder or 0), d_attn
    layers = _config_get(config, "num_hidden_layers", "n_layer", "num_layers")
    return int(layers or 0), d_attn


def _matmul_weight_params(model: torch.nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            # in x out, not weight.numel(): 4-bit weights are packed and ZeRO-3 shards are empty locally.
            total += int(module.in_features) * int(module.out_features)
        elif isinstance(module, Conv1D):
            total += int(module.nx) * int(module.nf)
    return total


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward), from the model's shapes.

    PaLM appendix B (arXiv 2204.02311): ``6 * N + 12 * L * d_attn * seq_len`` where ``N`` counts the weights of
    every matmul (``nn.Linear`` and transformers' ``Conv1D``, the LM head included, embedding lookups excluded)
    and the second term is the attention score and value matmuls of ``L`` attention layers with
    ``d_attn = heads * head_dim``. The attention term is the non-causal count, as PaLM uses (a causal kernel
    does about half of it). Encoder-decoder models count cross-attention as one more attention layer per
    decoder layer and use ``seq_len`` for both sides; this is the usual approximation, not an exact count.
    """
    model = getattr(model, "module", model)  # DDP / DeepSpeed engines wrap the model
    matmul = _matmul_weight_params(model)
    config = getattr(model, "config", None)
    layers, d_attn = _attention_shape(config) if config is not None else (0, 0)
    if layers == 0:
        logger.warning("Could not find attention layers in the model config; counting matmul weights only.")
    return 6 * matmul + 12 * layers * d_attn * int(seq_len)


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


def _measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a square ``a @ b`` in ``dtype``, sized so the whole measurement stays under ~1 s."""
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
    # Best of as many reps as the budget allows: on a shared machine the best rep is the least disturbed one.
    best = elapsed
    for _ in range(200):
        if time.perf_counter() + best > deadline:
            break
        best = min(best, timed(a, b))
    return 2 * n**3 / best


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[float, str]:
    """Peak dense matmul FLOP/s of one device in ``dtype``, and where the number came from.

    A known CUDA part returns its data-sheet peak (``"known:<device name>"``; fp32 uses the TF32 peak when
    TF32 matmuls are enabled). Anything else is measured with a square matmul and cached in
    ``cache_dir("peak_flops.json")`` per device name, dtype, torch version and thread count
    (``"measured:<device>:<dtype>:<n> threads"``). A measured CPU number is what this machine reaches, so CPU
    MFU reads against an achievable, not a theoretical, peak.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = _device_name(device)
    if device.type == "cuda":
        known = _known_peak(name, dtype)
        if known is not None:
            return known, f"known:{name}"

    dtype_name = str(dtype).removeprefix("torch.")
    threads = torch.get_num_threads()
    source = f"measured:{name}:{dtype_name}:{threads} threads"
    key = f"{name}|{dtype_name}|torch {torch.__version__}|{threads} threads"
    path = cache_dir("peak_flops.json")
    cached = _read_json(path)
    if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
        return float(cached[key]), source

    value = _measure_matmul_flops(device, dtype)
    logger.info("Measured peak %.3g FLOP/s on %s (%s, %d threads)", value, name, dtype_name, threads)
    cached = _read_json(path)  # re-read: another process may have added other keys meanwhile
    cached[key] = value
    write_json_atomic(path, cached)
    return value, source


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------- memory


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:  # bitsandbytes shares one qmap tensor across all parameters
            return 0
        seen.add(id(obj))
        local = obj.to_local() if hasattr(obj, "to_local") else obj  # FSDP2 DTensor: this rank's shard
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in ``optimizer.state`` on this process (moments, 8-bit states, absmax, qmaps, steps).

    Accelerate's ``AcceleratedOptimizer`` (and DeepSpeed's wrappers) are unwrapped through ``.optimizer``; a
    tensor shared by several parameters' states is counted once. Under DeepSpeed ZeRO the inner optimizer holds
    only this rank's flat fp32 partition, so the figure is what this process really keeps (about 1/world_size of
    DDP's; in CPU memory when offloaded; tests/e2e/test_distributed.py checks ZeRO-2 and ZeRO-3 with offload).
    ``peak_memory`` is per process as well.
    """
    if optimizer is None:
        return 0
    seen_wrappers: set[int] = set()
    while getattr(optimizer, "optimizer", None) is not None and id(optimizer) not in seen_wrappers:
        seen_wrappers.add(id(optimizer))
        optimizer = optimizer.optimizer
    state = getattr(optimizer, "state", None) or {}
    seen: set[int] = set()
    return sum(_tensor_bytes(s, seen) for s in state.values())


def peak_memory() -> dict[str, int]:
    """Peak resident bytes of this process (``cpu_rss``) and peak CUDA allocation (``cuda``) when CUDA was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_rss": int(rss) if sys.platform == "darwin" else int(rss) * 1024}  # Linux reports KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = int(torch.cuda.max_memory_allocated())
    return out


def versions() -> dict[str, str | None]:
    """Python and package versions from installed metadata (nothing heavy is imported); None where missing."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    if out["hf_efftrain"] is None:  # running from a source tree that is not pip-installed
        out["hf_efftrain"] = getattr(sys.modules.get("hf_efftrain"), "__version__", None)
    return out


# ---------------------------------------------------------------------------------------------------- report


def _param_count(param: torch.nn.Parameter) -> int:
    if hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 leaves an empty local tensor
        return int(param.ds_numel)
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:  # bnb 4-bit packs two per byte
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def _dtype_of(args: Any) -> torch.dtype:
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return torch.float32


def build_run_report(
    trainer: Trainer,
    train_output: TrainOutput,
    techniques: list,
    seq_len: int,
    extra: dict | None = None,
) -> dict[str, Any]:
    """The ``run_report.json`` content (DESIGN.md, "Every run leaves evidence") of a finished Trainer run.

    Throughput covers this ``train()`` call only (a resumed run does not count earlier sessions' tokens).
    ``tokens_per_second`` counts the tokens the Trainer tracked (``include_num_input_tokens_seen``), summed over
    processes, so MFU divides by ``world_size`` peaks. Anything that could not be computed is None, with the
    reason in ``notes``.
    """
    notes: list[str] = []
    state = trainer.state
    metrics = dict(getattr(train_output, "metrics", None) or {})
    runtime = metrics.get("train_runtime")

    tokens = state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    tokens_per_second: float | None = None
    if not tokens:
        setting = getattr(trainer.args, "include_num_input_tokens_seen", None)
        notes.append(
            f"tokens_per_second: the Trainer counted no input tokens (include_num_input_tokens_seen={setting!r})"
        )
    elif not runtime:
        notes.append("tokens_per_second: train_runtime is missing or zero")
    else:
        tokens_per_second = tokens / runtime

    losses = [(e["step"], e["loss"]) for e in state.log_history if "loss" in e and "step" in e]
    eval_losses = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]

    model = trainer.model
    params = list(model.parameters())
    accelerator = trainer.accelerator
    world_size = int(accelerator.num_processes)

    memory = peak_memory()  # before peak_flops: a measurement's matmul must not count as the run's peak
    flops_per_token = model_flops_per_token(model, seq_len)
    dtype = _dtype_of(trainer.args)
    peak, peak_source = peak_flops(trainer.args.device, dtype)
    run_mfu = None
    if tokens_per_second is not None:
        run_mfu = mfu(tokens_per_second, flops_per_token, peak, world_size)

    technique_reports = []
    for t in techniques:
        entry: dict[str, Any] = {"name": t.name, "config": t.config.model_dump(mode="json")}
        tech_report = t.report() if hasattr(t, "report") else None
        if tech_report:
            entry["report"] = tech_report
        technique_reports.append(entry)

    report: dict[str, Any] = {
        "tokens_per_second": tokens_per_second,
        "samples_per_second": metrics.get("train_samples_per_second"),
        "wall_time_s": runtime,
        "steps": int(state.global_step),
        "train_loss_first": losses[0][1] if losses else None,
        "train_loss_final": losses[-1][1] if losses else None,
        "train_loss_mean": metrics.get("train_loss"),
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "tokens_seen": int(tokens),
        "seq_len": int(seq_len),
        "params_total": sum(_param_count(p) for p in params),
        "params_trainable": sum(_param_count(p) for p in params if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "peak_memory_bytes": memory,
        "model_flops_per_token": flops_per_token,
        "mfu": run_mfu,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "device": str(trainer.args.device),
        "world_size": world_size,
        "distributed_type": getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type)),
        "techniques": technique_reports,
        "versions": versions(),
        "loss_history": losses,
        "loss_curve": loss_curve(state.log_history),
        "notes": notes,
    }
    for note in notes:
        logger.warning("run report: %s", note)
    report.update(extra or {})
    return report


def loss_curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Train loss with the time and tokens at which it was logged: ``{step, loss, time_s, tokens}`` per entry.

    ``time_s`` is the Trainer's ``train_runtime`` at that log (seconds since ``train()`` began, minus the runtime of
    evaluations run so far); ``tokens`` its ``num_input_tokens_seen`` (None where the Trainer counted none). The
    benchmark runner reads loss against wall time and tokens from here, for the stock Trainer and EffTrainer alike.
    """
    curve, eval_s = [], 0.0
    for e in log_history:
        eval_s += float(e.get("eval_runtime", 0.0))
        if "loss" in e and "step" in e:
            runtime = e.get("train_runtime")
            curve.append(
                {
                    "step": int(e["step"]),
                    "loss": float(e["loss"]),
                    "time_s": None if runtime is None else max(0.0, float(runtime) - eval_s),
                    "tokens": e.get("num_input_tokens_seen"),
                }
            )
    return curve


def write_run_report(output_dir: str | Path, report: dict[str, Any]) -> Path:
    """Write ``output_dir/run_report.json`` atomically and return its path."""
    path = Path(output_dir) / REPORT_FILE
    write_json_atomic(path, report)
    return path
