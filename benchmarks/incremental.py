"""Incremental-learning benchmark (issue 6): progressive stacking, progressive layer dropping and layer freezing
against the plain ``transformers.Trainer`` on the same full-size model, data and seed, in one run.

    python benchmarks/incremental.py [--quick] [--steps 150] [--out benchmarks/results/incremental]

The baseline trains ``steps`` optimizer steps; each technique trains 1.5x as many (constant lr after warm-up, so
longer is simply more of the same run) so that it can reach the baseline's final loss even when each of its steps
learns less. Every ``eval_every`` steps the model (every block it has, unscaled) is evaluated on held-out text; wall
time counts training only (each evaluation's runtime is subtracted). Reported per variant:
- time and tokens to reach the baseline's final eval loss (first evaluation at or below it), and the speed-up
  ``baseline time / time to reach``;
- eval loss at the baseline's final wall time (linear interpolation between evaluations; a run that ended earlier
  counts with its final loss, and says so);
- mean step time.
Curves: ``loss.png`` (eval loss against training wall time, and against tokens); table: ``results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_efftrain import Recipe
from hf_efftrain.build import build

LAYERS = 8


def variants(steps: int) -> dict[str, list[dict]]:
    return {
        "baseline": [],
        "progressive_stacking": [{"name": "progressive_stacking", "start_layers": 2}],  # 2 -> 4 -> 8 blocks
        # gamma: theta(t) halfway to theta_bar after ~15% of the run (PLD's 1e-3 is tuned for ~100k-step runs)
        "layer_dropping": [{"name": "layer_dropping", "theta_bar": 0.5, "gamma": round(4.0 / steps, 6)}],
        "layer_freezing": [{"name": "layer_freezing", "final_fraction": 0.5}],  # ramp over 25%..75% of the run
    }


def recipe(out: Path, steps: int, eval_every: int, quick: bool, techniques: list[dict]) -> Recipe:
    return Recipe.parse(
        {
            "model": {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": LAYERS}},
            "data": {
                "train": "builtin:stdlib-docs",
                "max_length": 64 if quick else 128,
                "max_eval_samples": 32 if quick else 64,
            },
            "training": {
                "output_dir": str(out),
                "max_steps": steps,
                "per_device_train_batch_size": 16,
                "per_device_eval_batch_size": 32,
                "learning_rate": 1e-3,
                "lr_scheduler_type": "constant_with_warmup",
                "warmup_steps": max(1, steps // 20),
                "logging_steps": 1,
                "eval_strategy": "steps",
                "eval_steps": eval_every,
                "seed": 0,
                "disable_tqdm": True,
                "dataloader_pin_memory": False,
            },
            "techniques": techniques,
        }
    )


class Clock(TrainerCallback):
    """Training wall time (evaluation runtime subtracted), tokens seen, and eval loss at each evaluation."""

    def __init__(self):
        self.t0 = 0.0
        self.eval_time = 0.0
        self.points: list[dict] = []  # eval points
        self.train_losses: list[tuple[float, int, float]] = []
        self.steps_done = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_time

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.train_losses.append((self.now(), state.num_input_tokens_seen, float(logs["loss"])))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.eval_time += float(metrics.get("eval_runtime", 0.0))
        self.points.append(
            {
                "step": state.global_step,
                "time_s": self.now(),
                "tokens": state.num_input_tokens_seen,
                "eval_loss": float(metrics["eval_loss"]),
            }  # fmt: skip
        )

    def on_train_end(self, args, state, control, **kw):
        self.total_s = self.now()
        self.steps_done = state.global_step


def run(name: str, techniques: list[dict], steps: int, eval_every: int, quick: bool, tmp: Path) -> dict:
    built = build(recipe(tmp / name, steps, eval_every, quick, techniques))
    if name == "baseline":  # the stock Trainer; only data preparation is shared
        trainer = built.plain_trainer()
    else:
        trainer = built.trainer
    clock = Clock()
    trainer.add_callback(clock)  # last: its clock includes the techniques' own callbacks
    trainer.train()
    reports = {t.name: t.report() for t in built.techniques}
    return {
        "trainer": type(trainer).__name__,
        "steps": clock.steps_done,
        "train_time_s": clock.total_s,
        "step_time_s": clock.total_s / max(1, clock.steps_done),
        "tokens": trainer.state.num_input_tokens_seen,
        "evals": clock.points,
        "train_losses": clock.train_losses,
        "technique_report": reports,
    }


def first_at_or_below(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["eval_loss"] <= target), None)


def loss_at_time(points: list[dict], t: float) -> float | None:
    """Eval loss at training time ``t``: interpolated between evaluations; after a run's last evaluation (it may
    have ended before ``t``), its final loss."""
    if not points:
        return None
    if t >= points[-1]["time_s"]:
        return points[-1]["eval_loss"]
    prev = {"time_s": 0.0, "eval_loss": points[0]["eval_loss"]}
    for p in points:
        if p["time_s"] >= t:
            span = p["time_s"] - prev["time_s"]
            w = 0.0 if span <= 0 else (t - prev["time_s"]) / span
            return prev["eval_loss"] + w * (p["eval_loss"] - prev["eval_loss"])
        prev = p
    return None


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    base = runs["baseline"]
    target = base["evals"][-1]["eval_loss"]
    t_base = base["train_time_s"]
    summary = {}
    for name, r in runs.items():
        hit = first_at_or_below(r["evals"], target)
        summary[name] = {
            "steps": r["steps"],
            "step_time_s": r["step_time_s"],
            "train_time_s": r["train_time_s"],
            "tokens": r["tokens"],
            "final_eval_loss": r["evals"][-1]["eval_loss"],
            "time_to_baseline_loss_s": hit["time_s"] if hit else None,
            "tokens_to_baseline_loss": hit["tokens"] if hit else None,
            "steps_to_baseline_loss": hit["step"] if hit else None,
            "speedup_to_baseline_loss": t_base / hit["time_s"] if hit and hit["time_s"] > 0 else None,
            "eval_loss_at_baseline_time": loss_at_time(r["evals"], t_base),
            "ended_before_baseline_time": r["train_time_s"] < t_base,
        }
    return summary


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        xs = [p["time_s"] for p in r["evals"]]
        ys = [p["eval_loss"] for p in r["evals"]]
        a.plot(xs, ys, marker=".", label=name)
        b.plot([p["tokens"] / 1e3 for p in r["evals"]], ys, marker=".", label=name)
    target = runs["baseline"]["evals"][-1]["eval_loss"]
    for ax, xlabel in ((a, "training wall time (s)"), (b, "tokens seen (k)")):
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss (every block of the current model, unscaled)")
        ax.legend()
    a.set_title("eval loss vs wall time (dashed: baseline final)")
    b.set_title("eval loss vs tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v: float | None, spec: str) -> str:
    return "not reached" if v is None else format(v, spec)


def ended(s: dict) -> str:
    return f" (its run ended at {s['train_time_s']:.0f} s)" if s["ended_before_baseline_time"] else ""


def markdown(summary: dict[str, dict], steps: int, quick: bool) -> str:
    base = summary["baseline"]
    lines = [
        f"Incremental learning: tiny-llama with {LAYERS} blocks (hidden 128), stdlib-docs, batch 16 x "
        f"{64 if quick else 128} tokens, lr 1e-3 constant after warm-up; baseline = plain transformers.Trainer, "
        f"{steps} steps; techniques (EffTrainer) {int(1.5 * steps)} steps. Wall time = training only.",
        "",
        "| variant | step time (ms) | final eval loss | time to baseline's final loss (s) | speed-up | "
        "tokens to it | eval loss at baseline's wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {1e3 * s['step_time_s']:.1f} | {s['final_eval_loss']:.4f} | "
            f"{fmt(s['time_to_baseline_loss_s'], '.1f')} | {fmt(s['speedup_to_baseline_loss'], '.2f')}"
            f"{'x' if s['speedup_to_baseline_loss'] else ''} | {fmt(s['tokens_to_baseline_loss'], ',')} | "
            f"{fmt(s['eval_loss_at_baseline_time'], '.4f')}{ended(s)} |"
        )
    lines += ["", f"Baseline: {base['train_time_s']:.1f} s, {base['tokens']:,} tokens, final eval loss "
              f"{base['final_eval_loss']:.4f}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps, shorter sequences")
    p.add_argument("--steps", type=int, default=None, help="baseline steps (default 150; quick: 16)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/incremental (quick: a temp dir)")
    a = p.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steps = a.steps or (16 if a.quick else 150)
    eval_every = max(2, steps // 16)
    tmp = Path(tempfile.mkdtemp(prefix="incremental_"))  # trainers' output dirs: nothing there is kept
    out = a.out or (tmp / "results" if a.quick else Path("benchmarks/results/incremental"))
    runs = {}
    for name, techniques in variants(int(1.5 * steps)).items():
        n = steps if name == "baseline" else int(1.5 * steps)
        runs[name] = run(name, techniques, n, eval_every, a.quick, tmp)
        print(
            f"{name}: {runs[name]['train_time_s']:.1f} s, final eval loss {runs[name]['evals'][-1]['eval_loss']:.4f}"
        )
    summary = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "steps": steps,
                "quick": a.quick,
                "layers": LAYERS,
                "torch_threads": torch.get_num_threads(),
                "summary": summary,
                "runs": runs,
            },
            indent=1,
        )
    )
    plot(runs, out / "loss.png")
    md = markdown(summary, steps, a.quick)
    (out / "results.md").write_text(md)
    print(md)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
