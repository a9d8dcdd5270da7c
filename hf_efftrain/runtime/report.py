"""Human-readable evidence of a run: ``loss.png`` and the summary table ``hf-efftrain train`` prints at the end.

The numbers come from ``metrics.build_run_report`` (docs/ARCHITECTURE.md, "The life of a run"); this module only
draws and formats them, so it needs nothing but the report dict or the Trainer's ``log_history``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
# The evaluation metrics a run may report (core/evaluation.py, metrics.eval_metrics): a row each, when present.
_EVAL_ROWS = (
    ("eval_perplexity", "eval perplexity", (",.2f",)),
    ("eval_token_accuracy", "eval token accuracy", (".2f", 0.01, " %")),
    ("eval_accuracy", "eval accuracy", (".2f", 0.01, " %")),
    ("eval_macro_f1", "eval macro-F1", (".4f",)),
)


def plot_loss(log_history: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Save train loss (and eval loss, when logged) against step as a PNG at ``path``; return the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines; set here, not at import, to leave callers' choice
    import matplotlib.pyplot as plt

    history = list(log_history)
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", marker="." if len(train) < 50 else None)
        if evals:
            ax.plot(*zip(*evals, strict=True), label="eval loss", marker="o")
        if not train and not evals:
            logger.warning("No loss was logged; %s shows an empty plot.", path)
            ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _num(value: Any, fmt: str, scale: float | None = None, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value if scale is None else value / scale:{fmt}}{suffix}"


def _count(n: Any) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def summary_table(report: Mapping[str, Any]) -> str:
    """A short aligned plain-text table of a run report's key numbers, for the CLI to print."""
    memory = report.get("peak_memory_bytes") or {}
    loss = f"{_num(report.get('train_loss_first'), '.4f')} -> {_num(report.get('train_loss_final'), '.4f')}"
    trainable, total = report.get("params_trainable"), report.get("params_total")
    rows = [
        ("steps", _num(report.get("steps"), "d")),
        ("train loss (first -> final)", loss),
        ("eval loss", _num(report.get("eval_loss"), ".4f")),
    ]
    rows += [(name, _num(report[key], *fmt)) for key, name, fmt in _EVAL_ROWS if report.get(key) is not None]
    rows += [
        ("tokens/s", _num(report.get("tokens_per_second"), ",.1f")),
        ("samples/s", _num(report.get("samples_per_second"), ",.2f")),
        ("wall time", _num(report.get("wall_time_s"), ".1f", suffix=" s")),
        ("peak RSS", _num(memory.get("cpu_rss"), ",.0f", _MIB, " MiB")),
    ]
    if "cuda" in memory:
        rows.append(("peak CUDA allocated", _num(memory["cuda"], ",.0f", _MIB, " MiB")))
    rows += [
        ("optimizer state", _num(report.get("optimizer_state_bytes"), ",.1f", _MIB, " MiB")),
        ("params (trainable / total)", f"{_count(trainable)} / {_count(total)}"),
        ("MFU (work counted)", _num(report.get("mfu"), ".2f", 0.01, " %")),
    ]
    if "mfu_dense" in report:  # PaLM's dense 6N + 12 L d s, as other tools count it
        rows.append(("MFU (dense 6N+12Lds)", _num(report["mfu_dense"], ".2f", 0.01, " %")))
    if report.get("peak_flops_source"):
        when = f", measured {report['peak_flops_measured_at']}" if report.get("peak_flops_measured_at") else ""
        rows.append(("peak FLOP/s", f"{_num(report.get('peak_flops'), '.3g')} ({report['peak_flops_source']}{when})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
