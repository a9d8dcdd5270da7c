"""Optimizer benchmark (issue 3): AdamW, Lion, Lion 8-bit, AdamW 8-bit (bitsandbytes) and LAMB on one model and data.

    python benchmarks/optimizers.py [--quick] [--steps 60] [--repeats 3] [--out benchmarks/results/optimizers]

Same tiny model (builtin tiny-llama), data (stdlib-docs), batch, seed and learning-rate schedule for every row; the
baseline row is the stock ``transformers.Trainer`` with torch AdamW, the others are ``EffTrainer`` with one
technique. Lion takes its lr and weight decay from the baseline's AdamW settings through ``from_adamw`` (the
paper's rule, factor 3); LAMB uses the baseline's lr and weight decay unchanged. Nothing is tuned, so the loss column
says how each optimizer does with these settings over these few steps, not which is better.

Measured: optimizer-state bytes (``hf_efftrain.metrics.optimizer_state_bytes``), median step time after a warm-up
(variants run interleaved, as in ``core_overhead.py``; the median over repeats, with min..max), and the loss after
the same number of steps. Writes ``results.{md,json}`` and ``loss_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from core_overhead import StepTimer  # the sibling benchmark (a script's folder is on sys.path)

from hf_efftrain import Recipe
from hf_efftrain.build import build
from hf_efftrain.metrics import optimizer_state_bytes

logger = logging.getLogger("benchmarks.optimizers")

LR, WEIGHT_DECAY = 1e-3, 0.1
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "adamw (plain Trainer)": [],
    "lion": [{"name": "lion", "from_adamw": {"factor": 3}}],
    "lion 8-bit": [{"name": "lion", "from_adamw": {"factor": 3}, "bits": 8}],
    "adamw 8-bit (bnb)": [{"name": "optimizer", "type": "adamw_bnb_8bit"}],
    "lamb": [{"name": "lamb"}],
}
BASELINE = "adamw (plain Trainer)"


def recipe(steps: int, out: Path, techniques: list[dict[str, Any]]) -> Recipe:
    return Recipe.parse(
        {
            "model": {"name_or_path": "builtin:tiny-llama"},
            "data": {"train": "builtin:stdlib-docs", "max_length": 128},
            "training": {
                "output_dir": str(out),
                "max_steps": steps,
                "per_device_train_batch_size": 16,
                "learning_rate": LR,
                "weight_decay": WEIGHT_DECAY,
                "lr_scheduler_type": "constant",
                "logging_steps": 1,
                "seed": 0,
                "disable_tqdm": True,
                "dataloader_pin_memory": False,
            },
            "techniques": techniques,
        }
    )


def _unwrap(optimizer: Any) -> Any:
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def run_variant(name: str, steps: int, warmup: int, out: Path) -> dict[str, Any]:
    built = build(recipe(steps, out / name.replace(" ", "_"), VARIANTS[name]))
    if name == BASELINE:  # the stock Trainer, no hf_efftrain code in the loop; only data prep shared
        trainer = built.plain_trainer()
    else:
        trainer = built.trainer
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    opt = _unwrap(trainer.optimizer)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    group = opt.param_groups[0]
    return {
        "optimizer": f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__}",
        "lr": group["lr"],
        "weight_decay": max(g["weight_decay"] for g in opt.param_groups),
        "step_time_s": statistics.median(timer.times[warmup:]),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "loss_final": losses[-1],
        "loss_curve": losses,
    }


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        for name, losses in curves.items():  # 8-bit dashed: it lies almost on top of its 32-bit twin
            ax.plot(range(1, len(losses) + 1), losses, label=name, linestyle="--" if "8-bit" in name else "-")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title("tiny-llama on stdlib-docs, same data and seed")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 1 repeat")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/optimizers"))
    a = p.parse_args()
    steps, repeats = (8, 1) if a.quick else (a.steps, a.repeats)
    warmup = min(5, steps // 2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    tmp = Path(tempfile.mkdtemp(prefix="bench_optimizers_"))  # trainers' output dirs: nothing there is kept
    for r in range(repeats):
        for v in VARIANTS:
            logger.info("repeat %d/%d: %s", r + 1, repeats, v)
            runs[v].append(run_variant(v, steps, warmup, tmp))

    base_bytes = runs[BASELINE][0]["optimizer_state_bytes"]
    summary: dict[str, dict[str, Any]] = {}
    for v, rs in runs.items():
        times = [r["step_time_s"] for r in rs]
        summary[v] = {
            **{k: rs[0][k] for k in ("optimizer", "lr", "weight_decay", "optimizer_state_bytes", "loss_final")},
            "state_over_adamw": rs[0]["optimizer_state_bytes"] / base_bytes,
            "step_time_s": statistics.median(times),
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "same_loss_every_repeat": len({r["loss_final"] for r in rs}) == 1,
            "loss_curve": rs[0]["loss_curve"],
        }
    base_time = summary[BASELINE]["step_time_s"]

    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"quick": a.quick, "steps": steps, "repeats": repeats, "warmup_steps_excluded": warmup}
    (a.out / "results.json").write_text(json.dumps({**meta, "summary": summary}, indent=2))
    plot({v: s["loss_curve"] for v, s in summary.items()}, a.out / "loss_curves.png")
    lines = [
        f"Optimizer benchmark{' (QUICK smoke run)' if a.quick else ''}: tiny-llama (4 layers, hidden 128), "
        f"stdlib-docs, batch 16 x 128 tokens, constant lr, {steps} steps, {repeats} interleaved repeat(s); step time "
        f"= median after {warmup} warm-up steps (min..max of repeats). Baseline: stock Trainer, torch AdamW "
        f"lr {LR:g}, weight decay {WEIGHT_DECAY:g}.",
        "",
        "| variant | optimizer | lr | weight decay | optimizer state (bytes) | vs AdamW | step time (ms) "
        "| vs AdamW | loss @ end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, s in summary.items():
        lines.append(
            f"| {v} | {s['optimizer']} | {s['lr']:.3g} | {s['weight_decay']:.3g} | {s['optimizer_state_bytes']:,} "
            f"| {s['state_over_adamw']:.3f} | {1e3 * s['step_time_s']:.1f} ({1e3 * s['step_time_min_s']:.1f}.."
            f"{1e3 * s['step_time_max_s']:.1f}) | {s['step_time_s'] / base_time:.3f}x | {s['loss_final']:.4f} |"
        )
    lines += [
        "",
        "Loss curves: `loss_curves.png`. 8-bit states keep uint8 codes plus one float32 absmax per 256 elements; "
        "tensors under 4096 elements and nn.Embedding weights keep 32-bit state (bitsandbytes' and the Trainer's "
        "rules), so the whole-model ratio is above the 1/4 of a large tensor.",
        "LAMB moves each adapted tensor by lr x ||w|| per step (a relative change of lr), so at AdamW's lr it starts "
        "slowly here; it is meant for large batches with a larger lr (see the large_batch technique).",
    ]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
