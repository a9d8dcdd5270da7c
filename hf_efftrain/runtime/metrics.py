"""What a run measured: FLOPs per token, MFU, peak memory, optimizer-state bytes, and ``run_report.json``.

Every run leaves evidence (docs/ARCHITECTURE.md): the survey (Zhuang et al. 2023, arXiv 2302.01107) compares
techniques by compute, memory and wall-clock, so each run records throughput, model FLOPs utilisation (MFU, PaLM
appendix B, Chowdhery et al. 2022, arXiv 2204.02311), peak memory and the bytes its optimizer keeps. The FLOPs
per token, and so ``mfu``, count the compute the run actually did (``flop_count.py``: no weight gradients for
frozen weights, no backward below the lowest trainable one, each technique's ``compute_fraction``), with
``flops_counted`` saying what was counted; ``model_flops_per_token_dense`` and ``mfu_dense`` keep PaLM's
``6N + 12 L d_attn s``, the figure other tools report. The loss plot and the summary table printed by the CLI live in
``report.py``, the peak FLOP/s in ``flops.py``; both are re-exported here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import platform
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..cache import write_json_atomic
from .flop_count import ComputeFraction, count_flops, dense_flops_per_token, matmul_dtype, model_flops_per_token
from .flops import device_peak, mfu, mfu_for_run, peak_flops
from .report import plot_loss, summary_table

if TYPE_CHECKING:
    from transformers import Trainer
    from transformers.trainer_utils import TrainOutput

logger = logging.getLogger(__name__)

__all__ = [  # FLOPs from flop_count.py / flops.py, plot_loss and summary_table from report.py: one import for callers
    "build_run_report", "count_flops", "dense_flops_per_token", "eval_metrics", "loss_curve", "mfu",
    "model_flops_per_token", "optimizer_state_bytes", "peak_flops", "peak_memory", "plot_loss", "summary_table",
    "versions", "write_run_report",
]  # fmt: skip

REPORT_FILE = "run_report.json"
# Tasks whose loss is a mean token cross-entropy (TASK_AUTO_CLASS in core/model_loading.py): exp(eval_loss) is a
# perplexity.
PERPLEXITY_TASKS = ("causal_lm", "sft", "masked_lm", "seq2seq")
# What the Trainer adds to every evaluation's metrics besides the loss: timings, not measures of quality.
_EVAL_BOOKKEEPING = frozenset(
    {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time",
     "eval_jit_compilation_time"}
)  # fmt: skip

_PACKAGES = (
    "torch", "transformers", "accelerate", "datasets", "tokenizers", "peft", "deepspeed", "bitsandbytes",
    "hf_efftrain",
)  # fmt: skip


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


def _dtype_of(args: Any, model: torch.nn.Module) -> torch.dtype:
    """The compute dtype whose peak MFU is against: autocast's, else the weights' own (``matmul_dtype``)."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return matmul_dtype(model)


def build_run_report(
    trainer: Trainer,
    train_output: TrainOutput,
    techniques: list,
    seq_len: int,
    extra: dict | None = None,
) -> dict[str, Any]:
    """The ``run_report.json`` content (docs/ARCHITECTURE.md, "The life of a run") of a finished Trainer run.

    Throughput covers this ``train()`` call only (a resumed run does not count earlier sessions' tokens).
    ``tokens_per_second`` counts the tokens the Trainer tracked (``include_num_input_tokens_seen``), summed over
    processes, so MFU divides by ``world_size`` peaks. ``model_flops_per_token`` (and ``mfu``) is the counted
    figure (``flops_counted`` says how: the parts, trainable vs frozen matmul weights, each technique's share),
    ``model_flops_per_token_dense`` (and ``mfu_dense``) PaLM's dense one. Anything that could not be computed is
    None, with the reason in ``notes``.
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
    evaluation = eval_metrics(state.log_history, (extra or {}).get("task"))
    if "eval_perplexity" in evaluation and evaluation["eval_perplexity"] is None and evaluation["eval_loss"]:
        notes.append(f"eval_perplexity: exp(eval_loss) is not finite (eval_loss={evaluation['eval_loss']})")

    model = trainer.model
    params = list(model.parameters())
    accelerator = trainer.accelerator
    world_size = int(accelerator.num_processes)

    memory = peak_memory()  # before peak_flops: a measurement's matmul must not count as the run's peak
    fractions = _compute_fractions(techniques, model, int(state.global_step), seq_len, notes)
    counted = count_flops(model, seq_len, fractions)
    flops_per_token = counted.total
    dtype = _dtype_of(trainer.args, model)
    device = trainer.args.device
    run_mfu, peak = None, None
    if tokens_per_second is not None:  # never over 1: a run beating the peak re-measures it, else no MFU
        run_mfu, peak, mfu_note = mfu_for_run(tokens_per_second, flops_per_token, device, dtype, world_size)
        if mfu_note:
            notes.append(mfu_note)
    peak = peak or device_peak(device, dtype)
    dense_mfu = None
    if tokens_per_second is not None:  # the same peak; never over 1 either
        dense_mfu = mfu(tokens_per_second, counted.dense, peak.flops, world_size)
        if dense_mfu > 1:
            notes.append(f"mfu_dense: {dense_mfu:.3g} > 1, the dense count overstates this run's work; not given")
            dense_mfu = None

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
        **evaluation,  # eval_loss, and the last evaluation's metrics (eval_accuracy, ..., eval_perplexity)
        "tokens_seen": int(tokens),
        "seq_len": int(seq_len),
        "params_total": sum(_param_count(p) for p in params),
        "params_trainable": sum(_param_count(p) for p in params if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "peak_memory_bytes": memory,
        "model_flops_per_token": flops_per_token,
        "model_flops_per_token_dense": counted.dense,
        "mfu": run_mfu,
        "mfu_dense": dense_mfu,
        "flops_counted": counted.as_dict(),
        "peak_flops": peak.flops,
        "peak_flops_source": peak.source,
        "peak_flops_measured_at": peak.measured_at,
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


def _compute_fractions(
    techniques: list, model: torch.nn.Module, steps: int, seq_len: int, notes: list[str]
) -> list[tuple[str, ComputeFraction]]:
    """Each technique's ``compute_fraction`` answer; one that fails is noted, never fatal (the report is evidence)."""
    out = []
    for t in techniques:
        hook = getattr(t, "compute_fraction", None)
        try:
            fraction = hook(model, steps, int(seq_len)) if hook is not None else None
        except Exception as e:
            logger.exception("run report: %s.compute_fraction failed", t.name)
            notes.append(f"flops_counted: {t.name}.compute_fraction failed ({type(e).__name__}: {e}); counted as 1.0")
            continue
        if fraction is not None:
            out.append((t.name, fraction))
    return out


def eval_metrics(log_history: list[dict[str, Any]], task: str | None = None) -> dict[str, float | None]:
    """``eval_loss`` and the other metrics of the last evaluation in ``log_history`` (what ``compute_metrics``
    returned: ``eval_accuracy``, ``eval_macro_f1``, ``eval_token_accuracy``, ...; not the Trainer's timings), plus
    ``eval_perplexity = exp(eval_loss)`` for a token-level ``task``, as transformers' ``run_clm.py`` / ``run_mlm.py``
    examples report it. The Trainer's ``eval_loss`` is the mean of the batches' mean token loss, so this is the
    corpus perplexity exactly when the evaluation batches hold equal numbers of label tokens."""
    last = next((e for e in reversed(log_history) if "eval_loss" in e), {})
    out: dict[str, float | None] = {"eval_loss": last.get("eval_loss")}
    for key, value in last.items():
        if key.startswith("eval_") and key not in _EVAL_BOOKKEEPING and not key.startswith("eval_mem_"):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = value
    if task in PERPLEXITY_TASKS:
        loss = out["eval_loss"]
        try:
            out["eval_perplexity"] = math.exp(loss) if loss is not None and math.isfinite(loss) else None
        except OverflowError:
            out["eval_perplexity"] = None
    return out


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
