"""Side-by-side figures of finished runs: the table and plots of ``hf-efftrain report`` and ``hf-efftrain bench``.

The survey (Zhuang et al. 2023, arXiv 2302.01107) compares techniques by the time, tokens and memory they need to
reach a given quality. Every figure here is read from the runs' ``run_report.json`` (``metrics.build_run_report``),
nothing is re-measured: throughput, MFU, peak memory, optimizer-state bytes and the final eval loss as the run
recorded them, the loss curve (``loss_curve``: loss with the step, wall time and tokens of each log), and any
``fields`` asked for (dotted paths into the report, e.g. ``techniques.sparse_training.report.sparsity_global``).

Losses are compared smoothed: a trailing mean over the last ``window`` logged train losses (causal, so "reached at
time t" only uses what was known at t). The target loss defaults to the baseline's final smoothed loss (median over
its repeats); a row reaches it at its first log whose smoothed loss is at or below it.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..runtime.metrics import REPORT_FILE
from .plots import PLOTS, plot_curves, plot_memory

__all__ = ["REPORT_FILE", "compare", "field_value", "load_report", "render", "smooth"]

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
DEFAULT_WINDOW = 10
# Per-run figures aggregated over repeats (median, min..max); the order is the order of results.json.
FIGURES = (
    "tokens_per_second", "step_time_s", "first_step_s", "warmup_s", "wall_time_s", "peak_rss_bytes", "rss_added_bytes",
    "planned_peak_bytes", "cuda_peak_bytes", "optimizer_state_bytes", "mfu", "final_loss", "loss_at_equal_steps",
    "loss_at_equal_time", "time_to_target_s", "tokens_to_target", "steps_to_target", "eval_loss",
)  # fmt: skip
# Figures where smaller is better: their ratio to the baseline is baseline / row, so > 1 always means "better".
_SMALLER_IS_BETTER = {"step_time_s", "first_step_s", "warmup_s", "time_to_target_s", "tokens_to_target"}


# ----------------------------------------------------------------------------------------------- curve analysis


def smooth(curve: Sequence[Mapping[str, Any]], window: int = DEFAULT_WINDOW) -> list[dict[str, Any]]:
    """The curve with ``loss`` replaced by the trailing mean of the last ``window`` logged losses (``raw`` keeps
    the logged value). Non-finite losses are kept: a diverged run must not look converged."""
    out, losses = [], []
    for point in curve:
        losses.append(float(point["loss"]))
        tail = losses[-max(1, int(window)) :]
        out.append({**point, "raw": float(point["loss"]), "loss": sum(tail) / len(tail)})
    return out


def first_reach(curve: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any] | None:
    """The first point of a (smoothed) curve whose loss is at or below ``target``; None if it never gets there."""
    return next((p for p in curve if math.isfinite(p["loss"]) and p["loss"] <= target), None)


def value_at(curve: Sequence[Mapping[str, Any]], key: str, x: float) -> float | None:
    """The curve's loss at ``key`` (``step``, ``time_s`` or ``tokens``) == ``x``, linearly interpolated between
    logs; before the first log, the first loss; None past the last log (the run did not get that far)."""
    points = [(float(p[key]), float(p["loss"])) for p in curve if p.get(key) is not None]
    if not points or x > points[-1][0] + 1e-9:
        return None
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return points[-1][1]


def step_time(curve: Sequence[Mapping[str, Any]]) -> float | None:
    """Median seconds per optimizer step between logs, leaving out the first interval (one-time set-up)."""
    points = [(p["step"], p["time_s"]) for p in curve if p.get("time_s") is not None]
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:], strict=False) if s1 > s0]
    rates = rates[1:] if len(rates) > 2 else rates
    return statistics.median(rates) if rates else None


def warmup_times(curve: Sequence[Mapping[str, Any]], per_step: float | None) -> tuple[float | None, float | None]:
    """What the steady ``per_step`` (``step_time``) leaves out: the first step (the time to the first log minus
    its other steps at ``per_step``; with a log per step, the first step itself, ``torch.compile``'s first
    compilation included) and the warm-up, the whole run's time beyond steps x ``per_step`` (compilations,
    recompilations, data loader start-up)."""
    points = [p for p in curve if p.get("time_s") is not None]
    if not points or per_step is None:
        return None, None
    first, last = points[0], points[-1]
    first_step = first["time_s"] - (first["step"] - 1) * per_step
    return max(0.0, first_step), max(0.0, last["time_s"] - last["step"] * per_step)  # steps faster than the median


# ------------------------------------------------------------------------------------------------ per-run figures


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir/run_report.json`` (or the file itself when given one)."""
    path = Path(run_dir)
    path = path / REPORT_FILE if path.is_dir() else path
    return json.loads(path.read_text())


def final_smoothed_loss(report: Mapping[str, Any], window: int = DEFAULT_WINDOW) -> float | None:
    curve = smooth(report.get("loss_curve") or [], window)
    return curve[-1]["loss"] if curve else None


def field_value(report: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of a run report; in a list of named entries (``techniques``) a part is the
    entry's ``name``. None where the path is absent (e.g. a technique the row does not use)."""
    node: Any = report
    for part in path.split("."):
        if isinstance(node, list):
            node = next((e for e in node if isinstance(e, Mapping) and e.get("name") == part), None)
        elif isinstance(node, Mapping):
            node = node.get(part)
        else:
            return None
    return node


def _losses(report: Mapping[str, Any]) -> list[tuple[int, float]]:
    return [(p["step"], p["loss"]) for p in report.get("loss_curve") or []]


def run_figures(
    report: Mapping[str, Any],
    *,
    window: int,
    target: float | None,
    equal_step: float | None,
    equal_time: float | None,
    rss_base: int | None = None,
    fields: Sequence[str] = (),
) -> dict[str, Any]:
    """One run's figures (``FIGURES``, then the ``fields`` read from its report) from its run report."""
    curve = smooth(report.get("loss_curve") or [], window)
    memory = report.get("peak_memory_bytes") or {}
    rss = memory.get("cpu_rss")
    reached = first_reach(curve, target) if target is not None else None
    per_step = step_time(curve)
    first_step, warmup = warmup_times(curve, per_step)
    return {
        "tokens_per_second": report.get("tokens_per_second"),
        "step_time_s": per_step,
        "first_step_s": first_step,
        "warmup_s": warmup,
        "wall_time_s": report.get("wall_time_s"),
        "peak_rss_bytes": rss,
        "rss_added_bytes": rss - rss_base if rss is not None and rss_base is not None else None,
        "planned_peak_bytes": report.get("planned_peak_bytes"),
        "cuda_peak_bytes": memory.get("cuda"),
        "optimizer_state_bytes": report.get("optimizer_state_bytes"),
        "mfu": report.get("mfu"),
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_at_equal_steps": value_at(curve, "step", equal_step) if equal_step is not None else None,
        "loss_at_equal_time": value_at(curve, "time_s", equal_time) if equal_time is not None else None,
        "time_to_target_s": reached["time_s"] if reached else None,
        "tokens_to_target": reached["tokens"] if reached else None,
        "steps_to_target": reached["step"] if reached else None,
        "eval_loss": report.get("eval_loss"),
        **{path: field_value(report, path) for path in fields},
    }


def _spread(values: list[Any]) -> dict[str, Any]:
    nums = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not nums:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(nums), "min": min(nums), "max": max(nums), "n": len(nums)}


def compare(
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    baseline: str,
    *,
    window: int = DEFAULT_WINDOW,
    target: float | None = None,
    rss_base: int | None = None,
    fields: Sequence[str] = (),
) -> dict[str, Any]:
    """Figures of every row (name -> its repeats' run reports) side by side, with ratios against ``baseline``.

    Equal steps: the fewest final steps of any run; equal wall time: the shortest final ``time_s`` of any run.
    The target loss defaults to the baseline's final smoothed loss, the median over its repeats. A row's
    ``same_losses_as_baseline``: every repeat logged exactly the baseline's first repeat's losses at every step.
    """
    done = {name: list(reports) for name, reports in rows.items() if reports}
    target_source = "given"
    if target is None and done.get(baseline):
        finals = [f for r in done[baseline] if (f := final_smoothed_loss(r, window)) is not None]
        target = statistics.median(finals) if finals else None
        target_source = f"baseline {baseline!r} final smoothed loss (median of {len(finals)} repeats)"
    curves = [r.get("loss_curve") or [] for reports in done.values() for r in reports]
    ends = [c[-1] for c in curves if c]
    equal_step = min((p["step"] for p in ends), default=None)
    equal_time = min((p["time_s"] for p in ends if p.get("time_s") is not None), default=None)

    base_losses = _losses(done[baseline][0]) if done.get(baseline) else None
    out_rows: dict[str, Any] = {}
    for name, reports in rows.items():
        runs = [
            run_figures(r, window=window, target=target, equal_step=equal_step, equal_time=equal_time,
                        rss_base=rss_base, fields=fields)
            for r in reports
        ]  # fmt: skip
        summary = {k: _spread([run[k] for run in runs]) for k in (*FIGURES, *fields)}
        same = bool(reports and base_losses) and all(_losses(r) == base_losses for r in reports)
        out_rows[name] = {"runs": runs, "summary": summary, "same_losses_as_baseline": same}
    base = out_rows.get(baseline, {}).get("summary", {})
    for row in out_rows.values():
        row["ratios"] = {k: _ratio(k, row["summary"].get(k), base.get(k)) for k in FIGURES}
    return {
        "baseline": baseline,
        "smoothing": f"trailing mean of the last {window} logged train losses",
        "window": window,
        "target_loss": target,
        "target_source": target_source,
        "equal_step": equal_step,
        "equal_time_s": equal_time,
        "rss_base_bytes": rss_base,
        "fields": list(fields),
        "rows": out_rows,
    }


def _ratio(key: str, row: Mapping[str, Any] | None, base: Mapping[str, Any] | None) -> float | None:
    a, b = (row or {}).get("median"), (base or {}).get("median")
    if a is None or b is None or a == 0 or b == 0:
        return None
    return b / a if key in _SMALLER_IS_BETTER else a / b


# ---------------------------------------------------------------------------------------------------- markdown


def _fmt(spread: Mapping[str, Any] | None, fmt: str, scale: float = 1.0, spread_shown: bool = True) -> str:
    if not spread or spread.get("median") is None:
        return "n/a"
    text = f"{spread['median'] / scale:{fmt}}"
    if spread_shown and spread.get("n", 0) > 1 and spread["min"] != spread["max"]:
        text += f" ({spread['min'] / scale:{fmt}}..{spread['max'] / scale:{fmt}})"
    return text


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


# (header, figure, format, scale, show the repeats' spread, show the ratio to the baseline)
_COLUMNS = [
    ("tokens/s", "tokens_per_second", ",.0f", 1.0, True, True),
    ("step time (ms)", "step_time_s", ".1f", 1e-3, True, True),
    ("first step (s)", "first_step_s", ".2f", 1.0, True, False),
    ("warm-up (s)", "warmup_s", ".2f", 1.0, True, False),
    ("peak RSS (MiB)", "peak_rss_bytes", ",.0f", _MIB, False, True),
    ("RSS added (MiB)", "rss_added_bytes", ",.0f", _MIB, False, True),
    ("planned (MiB)", "planned_peak_bytes", ",.0f", _MIB, False, False),
    ("CUDA peak (MiB)", "cuda_peak_bytes", ",.0f", _MIB, False, True),
    ("optimizer state (MiB)", "optimizer_state_bytes", ",.2f", _MIB, False, True),
    ("MFU counted (%)", "mfu", ".3f", 0.01, False, False),
    ("loss @ equal steps", "loss_at_equal_steps", ".4f", 1.0, False, False),
    ("loss @ equal time", "loss_at_equal_time", ".4f", 1.0, True, False),
    ("eval loss", "eval_loss", ".4f", 1.0, True, False),
    ("time to target (s)", "time_to_target_s", ".1f", 1.0, True, True),
    ("tokens to target", "tokens_to_target", ",.0f", 1.0, False, True),
]


def markdown_table(comparison: Mapping[str, Any], order: Sequence[str] | None = None,
                   errors: Mapping[str, str] | None = None) -> str:  # fmt: skip
    """The comparison as a markdown table: ``median (min..max)`` over repeats and ``[ratio]`` to the baseline
    (how each ratio is taken is said in ``notes``). Rows in ``errors`` without any finished repeat show as failed."""
    rows = comparison["rows"]
    errors = errors or {}
    order = list(order or rows)
    columns = [c for c in _COLUMNS if any(rows[n]["summary"][c[1]]["median"] is not None for n in rows)]
    fields = comparison.get("fields") or []
    heads = [f.rsplit(".", 1)[-1] for f in fields]
    for field, head in zip(fields, heads):  # named by the path's last part, by the whole path when that is ambiguous
        medians = [m for n in rows if (m := rows[n]["summary"][field]["median"]) is not None]
        if medians:
            fmt = ",.0f" if all(float(m).is_integer() for m in medians) else ".4g"
            columns.append((head if heads.count(head) == 1 else field, field, fmt, 1.0, True, False))
    header = ["variant", "status", *(c[0] for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in order:
        if name in errors and (name not in rows or rows[name]["summary"]["final_loss"]["median"] is None):
            cells = [name, "failed", *("" for _ in columns)]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        row = rows[name]
        cells = [name, "ok" if name not in errors else "partial"]
        for _, key, fmt, scale, spread_shown, ratio_shown in columns:
            text = _fmt(row["summary"][key], fmt, scale, spread_shown)
            if ratio_shown and text != "n/a":
                text += f" [{_x(row['ratios'][key])}]"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(comparison: Mapping[str, Any], errors: Mapping[str, str] | None = None) -> list[str]:
    """The lines under the table: what the columns mean and what failed."""
    c = comparison
    target = "n/a" if c["target_loss"] is None else f"{c['target_loss']:.4f}"
    equal_time = "n/a" if c["equal_time_s"] is None else f"{c['equal_time_s']:.1f} s"
    out = [
        f"- Baseline: `{c['baseline']}`. Cells: median over repeats (min..max when they differ); "
        "[ratio] to the baseline's median: tokens/s row/baseline; step time, time and tokens to target "
        "baseline/row (so > 1x is faster); memory row/baseline (so < 1x is less memory).",
        f"- Losses are smoothed: {c['smoothing']}. Target loss {target} ({c['target_source']}); a row reaches it "
        "at its first log whose smoothed loss is at or below it. n/a: not reached.",
        f"- Equal steps: step {c['equal_step']}; equal wall time: {equal_time} (the shortest run), training time "
        "from the start of `train()`, evaluations excluded.",
        "- tokens/s: the Trainer's `num_input_tokens_seen` (padding excluded) over `train_runtime`; step time: "
        "median seconds per step between logs, first interval left out (the steady state). first step: the time to "
        "the first log beyond its other steps at that step time (with a log per step, step 1 itself: set-up and "
        "`torch.compile`'s first compilation); warm-up: the run's training time beyond steps x step time "
        "(compilations and recompilations, data loader start-up).",
    ]
    if c.get("rss_base_bytes") is not None:
        out.append(
            f"- RSS added: peak RSS minus {c['rss_base_bytes'] / _MIB:,.0f} MiB, the RSS of a process that has "
            "imported torch, transformers and hf_efftrain but built nothing (the same for every row). "
            "Multi-process rows: rank 0's process."
        )
    if any(r["summary"].get("planned_peak_bytes", {}).get("median") is not None for r in c["rows"].values()):
        out.append(
            "- planned: `hf-efftrain plan`'s predicted peak of one training process for the row's recipe and "
            "accelerate config (weights, gradients, optimizer state, activations; on the CPU, offloaded parts "
            "included): compare with RSS added."
        )
    if any(r["summary"]["eval_loss"]["median"] is not None for r in c["rows"].values()):
        out.append("- eval loss: the run's evaluation on the held-out split (`data.eval`, else the train source's "
                   "validation split) after its last step, full model (eval mode).")  # fmt: skip
    same = [f"`{n}`" for n, r in c["rows"].items() if n != c["baseline"] and r.get("same_losses_as_baseline")]
    if same:
        out.append(f"- Logged exactly the baseline's train losses at every step: {', '.join(same)}.")
    for name, error in (errors or {}).items():
        out.append(f"- `{name}` failed: {error}")
    return out


def render(
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    out: str | Path,
    *,
    baseline: str,
    window: int = DEFAULT_WINDOW,
    target: float | None = None,
    rss_base: int | None = None,
    errors: Mapping[str, str] | None = None,
    title: str = "",
    extra: Mapping[str, Any] | None = None,
    fields: Sequence[str] = (),
    extra_notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Compare the rows, write ``results.json``, ``results.md`` and the plots into ``out``; return the results.
    ``fields``: extra columns (``field_value`` paths); ``extra_notes``: lines added under the table's notes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    comparison = compare(rows, baseline, window=window, target=target, rss_base=rss_base, fields=fields)
    table = markdown_table(comparison, list(rows), errors)
    lines = ([f"# {title}", ""] if title else []) + [table, "", *notes(comparison, errors), *extra_notes]
    machine = (extra or {}).get("machine")
    if machine:  # timing is only as good as the machine was quiet
        load = ", ".join(f"{machine[k][0]:.1f}" for k in ("loadavg_start", "loadavg_end"))
        cpu = f" ({machine['cpu']})" if machine.get("cpu") else ""
        lines.append(f"- Machine: {machine['cpu_count']} CPUs{cpu}, load average (1 min) at start and end {load}, "
                     f"OMP_NUM_THREADS={machine.get('OMP_NUM_THREADS')}.")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    curves = {
        n: [smooth(r.get("loss_curve") or [], window) for r in reports] for n, reports in rows.items() if reports
    }
    plot_curves(curves, "time_s", out / PLOTS[0], window, comparison["target_loss"])
    plot_curves(curves, "tokens", out / PLOTS[1], window, comparison["target_loss"])
    plot_memory(comparison, out / PLOTS[2])
    results = {**(extra or {}), **comparison, "errors": dict(errors or {}), "table": table}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
