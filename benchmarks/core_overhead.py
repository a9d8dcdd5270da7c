"""Core benchmark (issue 2): plain ``transformers.Trainer`` vs ``EffTrainer`` with no technique (overhead), and
AdamW vs Lion (optimizer-state bytes, step time), on the same model, data and seed, in one run.

    python benchmarks/core_overhead.py [--steps 60] [--repeats 3] [--out benchmarks/results/core_overhead]

Variants run interleaved (A B C, A B C, ...) so drift in machine load hits all of them alike; step time is the
median over steps after a warm-up, then the median over repeats (spread = min..max of the repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from hf_efftrain import Recipe
from hf_efftrain.build import build
from hf_efftrain.metrics import optimizer_state_bytes

WARMUP_STEPS = 5


def recipe(steps: int, out: Path, techniques: list[dict]) -> Recipe:
    return Recipe.parse(
        {
            "model": {"name_or_path": "builtin:tiny-llama"},
            "data": {"train": "builtin:stdlib-docs", "max_length": 128},
            "training": {
                "output_dir": str(out),
                "max_steps": steps,
                "per_device_train_batch_size": 16,
                "learning_rate": 1e-3,
                "lr_scheduler_type": "constant",
                "logging_steps": 1,
                "seed": 0,
                "disable_tqdm": True,
                "dataloader_pin_memory": False,
            },
            "techniques": techniques,
        }
    )


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def run_variant(name: str, steps: int, out: Path) -> dict:
    techniques = [{"name": "lion", "lr": 3e-4, "weight_decay": 0.1}] if name == "efftrainer_lion" else []
    built = build(recipe(steps, out / name, techniques))
    if name == "plain_trainer":  # the stock Trainer, no hf_efftrain code in the loop; only data prep shared
        trainer = built.plain_trainer()
    else:
        trainer = built.trainer
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "trainer": type(trainer).__name__,
        "optimizer": type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__,
        "step_time_s": statistics.median(timer.times[WARMUP_STEPS:]),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "optimizer_state_tensors": len(trainer.optimizer.state),
        "loss_final": losses[-1],
        "loss_curve": losses,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/core_overhead"))
    a = p.parse_args()
    variants = ["plain_trainer", "efftrainer", "efftrainer_lion"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    tmp = tempfile.mkdtemp(prefix="core_overhead_")  # trainers' output dirs: nothing there is kept
    for _ in range(a.repeats):
        for v in variants:
            runs[v].append(run_variant(v, a.steps, Path(tmp)))
    summary = {}
    for v, rs in runs.items():
        times = [r["step_time_s"] for r in rs]
        summary[v] = {
            **{k: rs[0][k] for k in ("trainer", "optimizer", "optimizer_state_bytes", "loss_final")},
            "step_time_s": statistics.median(times),
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "same_loss_every_repeat": len({r["loss_final"] for r in rs}) == 1,
        }
    base, eff, lion = (summary[v] for v in variants)
    ratios = {
        "efftrainer_overhead": eff["step_time_s"] / base["step_time_s"] - 1,
        "efftrainer_overhead_best_of_repeats": eff["step_time_min_s"] / base["step_time_min_s"] - 1,
        "efftrainer_same_losses_as_plain": (
            runs["efftrainer"][0]["loss_curve"] == runs["plain_trainer"][0]["loss_curve"]
        ),
        "lion_state_over_adamw": lion["optimizer_state_bytes"] / eff["optimizer_state_bytes"],
        # AdamW keeps two moments plus a 4-byte step counter per tensor; Lion keeps one moment.
        "lion_state_exactly_half_of_adamw_moments": 2 * lion["optimizer_state_bytes"]
        == eff["optimizer_state_bytes"] - 4 * runs["efftrainer"][0]["optimizer_state_tensors"],
        "lion_step_time_over_adamw": lion["step_time_s"] / eff["step_time_s"],
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(
        json.dumps({"steps": a.steps, "repeats": a.repeats, "summary": summary, "ratios": ratios}, indent=2)
    )
    lines = [
        f"Core benchmark: tiny-llama (4 layers, hidden 128), stdlib-docs, batch 16 x 128 tokens, {a.steps} steps, "
        f"{a.repeats} interleaved repeats; step time = median after {WARMUP_STEPS} warm-up steps "
        "(min..max of repeats).",
        "",
        "| variant | trainer | optimizer | step time (ms) | vs plain Trainer | optimizer state (bytes) | loss @ end |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        s = summary[v]
        lines.append(
            f"| {v} | {s['trainer']} | {s['optimizer']} | {1e3 * s['step_time_s']:.1f} "
            f"({1e3 * s['step_time_min_s']:.1f}..{1e3 * s['step_time_max_s']:.1f}) | "
            f"{s['step_time_s'] / base['step_time_s']:.3f}x | {s['optimizer_state_bytes']:,} | {s['loss_final']:.4f} |"
        )
    lines += [
        "",
        f"- EffTrainer (no technique) overhead vs plain Trainer: {100 * ratios['efftrainer_overhead']:+.2f}% "
        f"by medians, {100 * ratios['efftrainer_overhead_best_of_repeats']:+.2f}% by best repeats (target <= 2%); "
        f"identical loss curves: {ratios['efftrainer_same_losses_as_plain']}",
        f"- Lion optimizer state / AdamW: {ratios['lion_state_over_adamw']:.5f}; exactly half of AdamW's two "
        f"moments (AdamW also keeps a 4-byte step counter per tensor): "
        f"{ratios['lion_state_exactly_half_of_adamw_moments']}; Lion step time / AdamW: "
        f"{ratios['lion_step_time_over_adamw']:.3f}",
    ]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
