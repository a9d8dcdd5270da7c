"""The plots of ``hf-efftrain bench`` and ``hf-efftrain report`` (the figures behind them: ``compare.py``): smoothed
loss against wall time and against tokens, and the memory bars."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_MIB = 1024 * 1024
PLOTS = ("loss_vs_time.png", "loss_vs_tokens.png", "memory.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], key: str, path: Path, window: int,
                target: float | None = None) -> Path:  # fmt: skip
    """Smoothed train loss (``curves``: row -> one smoothed loss curve per repeat) against ``key`` (``time_s`` or
    ``tokens``), one colour per row, every repeat drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        for i, (name, runs) in enumerate(curves.items()):
            for j, run in enumerate(runs):
                curve = [p for p in run if p.get(key) is not None]
                if curve:
                    ax.plot([p[key] for p in curve], [p["loss"] for p in curve], color=f"C{i % 10}",
                            alpha=1.0 if j == 0 else 0.4, linewidth=1.2, label=name if j == 0 else None)  # fmt: skip
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
        ax.set_xlabel({"time_s": "training wall time (s)", "tokens": "real tokens seen"}.get(key, key))
        ax.set_ylabel(f"train loss (trailing mean of {window} logs)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def plot_memory(comparison: Mapping[str, Any], path: Path) -> Path:
    """Bars per row: peak RSS, RSS added (when known), CUDA peak (when used) and optimizer state, in MiB."""
    plt = _pyplot()
    rows = comparison["rows"]
    names = list(rows)
    series = [
        (label, key)
        for label, key in (("peak RSS", "peak_rss_bytes"), ("RSS added", "rss_added_bytes"),
                           ("CUDA peak", "cuda_peak_bytes"), ("optimizer state", "optimizer_state_bytes"))
        if any(rows[n]["summary"][key]["median"] is not None for n in names)
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 2), 4.5), dpi=100)
    try:
        width = 0.8 / max(1, len(series))
        for i, (label, key) in enumerate(series):
            values = [(rows[n]["summary"][key]["median"] or 0) / _MIB for n in names]
            ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("MiB (median over repeats)")
        ax.grid(True, axis="y", alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
