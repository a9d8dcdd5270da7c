"""Sparse-training benchmark (issue 3): a dense baseline against gradual magnitude pruning (Zhu & Gupta 2017, arXiv
1710.01878) at 50% and 80%, RigL (Evci et al. 2020, arXiv 1911.11134) at 80%, and 2:4 masks, at equal steps.

    python benchmarks/sparse.py [--quick] [--steps 200] [--out benchmarks/results/sparse]

Same tiny model (builtin tiny-llama), data (stdlib-docs), batch, seed and lr for every row. The baseline row is the
stock ``transformers.Trainer``; the others are ``EffTrainer`` with the ``sparse_training`` technique on the linear
layers of the transformer blocks (embeddings and LM head stay dense). Magnitude pruning ramps the sparsity on the cubic
schedule from 10% to 60% of the steps and fine-tunes after; RigL starts at 80% and swaps connections every 10% of the
steps until 75%; 2:4 masks are set after 10% of the steps. Measured: train loss at the end (the last logged value
and the mean of the last 10%), eval loss on the held-out split, the sparsity reached (from the technique's report:
global and per layer, and the fraction of masked weights that are exactly zero), and the median step time after a
warm-up. On a CPU the masks are applied, not exploited: no speed-up is expected (the masking costs a little); the 2:4
kernels are CUDA-only (tests/gpu/test_sparse_gpu.py). Writes ``results.{md,json}`` and ``loss.png`` into ``--out``.
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

logger = logging.getLogger("benchmarks.sparse")
BASELINE = "dense (plain Trainer)"


def variants(steps: int) -> dict[str, list[dict[str, Any]]]:
    start, end, every = max(1, steps // 10), max(2, 6 * steps // 10), max(1, steps // 20)
    magnitude = {"name": "sparse_training", "start_step": start, "end_step": end, "update_every": every}
    return {
        BASELINE: [],
        "magnitude 50%": [{**magnitude, "sparsity": 0.5}],
        "magnitude 80%": [{**magnitude, "sparsity": 0.8}],
        "rigl 80%": [
            {"name": "sparse_training", "method": "rigl", "sparsity": 0.8, "update_every": max(1, steps // 10)}
        ],
        "2:4": [{"name": "sparse_training", "pattern": "2:4", "start_step": start}],
    }


def recipe(a: argparse.Namespace, out: Path, techniques: list[dict[str, Any]]) -> Recipe:
    return Recipe.parse(
        {
            "model": {"name_or_path": "builtin:tiny-llama"},
            "data": {
                "train": "builtin:stdlib-docs",
                "max_length": a.max_length,
                "max_train_samples": a.steps * a.batch_size,
                "max_eval_samples": a.eval_samples,
            },
            "training": {
                "output_dir": str(out),
                "max_steps": a.steps,
                "per_device_train_batch_size": a.batch_size,
                "per_device_eval_batch_size": a.batch_size,
                "learning_rate": 1e-3,
                "weight_decay": 0.1,
                "lr_scheduler_type": "constant",
                "logging_steps": 1,
                "seed": 0,
                "disable_tqdm": True,
                "dataloader_pin_memory": False,
            },
            "techniques": techniques,
        }
    )


def run_variant(name: str, techniques: list[dict[str, Any]], a: argparse.Namespace, out: Path) -> dict[str, Any]:
    built = build(recipe(a, out / name.replace(" ", "_").replace(":", "-").replace("%", ""), techniques))
    if name == BASELINE:  # the stock Trainer, no hf_efftrain code in the loop; only data prep shared
        trainer = built.plain_trainer()
    else:
        trainer = built.trainer
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tail = losses[-max(1, len(losses) // 10) :]
    facts = built.techniques[0].report() if built.techniques else {}
    per_layer = facts.get("sparsity_per_layer", {})
    return {
        "trainer": type(trainer).__name__,
        "techniques": techniques,
        "loss_final": losses[-1],
        "loss_last_10pct_mean": statistics.mean(tail),
        "eval_loss": trainer.evaluate()["eval_loss"] if built.eval_dataset is not None else None,
        "sparsity_global": facts.get("sparsity_global", 0.0),
        "weights_zero_fraction": facts.get("weights_zero_fraction", 0.0),
        "sparsity_layer_min": min(per_layer.values(), default=0.0),
        "sparsity_layer_max": max(per_layer.values(), default=0.0),
        "sparsity_per_layer": per_layer,
        "mask_updates": facts.get("mask_updates", 0),
        "connections_changed": facts.get("connections_changed", 0),
        "step_time_s": statistics.median(timer.times[a.warmup :] or timer.times),
        "loss_curve": losses,
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, r in results.items():
        ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("Sparse training vs dense, tiny-llama on stdlib-docs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, short sequences, small batch")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/sparse (runs/ with --quick)")
    a = p.parse_args()
    if a.quick:
        a.steps, a.batch_size, a.max_length, a.eval_samples, a.warmup = 20, 8, 64, 32, 2
    out = a.out or Path("runs/bench_sparse_quick" if a.quick else "benchmarks/results/sparse")
    tmp = Path(tempfile.mkdtemp(prefix="bench_sparse_"))  # trainers' output dirs: nothing there is kept
    results = {name: run_variant(name, techniques, a, tmp) for name, techniques in variants(a.steps).items()}

    base = results[BASELINE]
    out.mkdir(parents=True, exist_ok=True)
    setup = {k: getattr(a, k) for k in ("steps", "batch_size", "max_length", "eval_samples", "warmup", "quick")}
    (out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    plot(results, out / "loss.png")
    lines = [
        f"Sparse training: tiny-llama (4 layers, hidden 128), stdlib-docs, batch {a.batch_size} x {a.max_length} "
        f"tokens, {a.steps} steps, AdamW lr 1e-3 constant, seed 0; step time = median after {a.warmup} warm-up steps.",
        "",
        "| variant | loss @ end | loss, last 10% | eval loss | sparsity (global) | per layer min..max | "
        "masked weights == 0 | mask updates | step time (ms) | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ev = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        lines.append(
            f"| {name} | {r['loss_final']:.4f} | {r['loss_last_10pct_mean']:.4f} | {ev} | "
            f"{r['sparsity_global']:.4f} | {r['sparsity_layer_min']:.3f}..{r['sparsity_layer_max']:.3f} | "
            f"{r['weights_zero_fraction']:.4f} | {r['mask_updates']} | {1e3 * r['step_time_s']:.1f} | "
            f"{r['step_time_s'] / base['step_time_s']:.3f}x |"
        )
    lines += [
        "",
        "Sparsity counts the masked linear layers of the transformer blocks only (embeddings, norms and LM head stay "
        "dense). On a CPU masks save no compute: the step-time column shows the cost of masking, not a speed-up.",
        "One seed and a short run of a 4-layer model: the loss columns show that each sparse variant trains at its "
        "sparsity, not how the variants would rank on a real model and budget.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
