"""Data-efficiency benchmark (issue 4): data pruning and selective backprop against the plain ``transformers.Trainer``
on the same model (tiny-llama), data (stdlib-docs) and seed, in one run.

    python benchmarks/data_pruning.py [--quick] [--out benchmarks/results/data_pruning]

A. Pruning at equal steps. Every variant trains the same number of optimizer steps S with the same batch size,
   so the pruned variants repeat their smaller set more often (equal compute). Compared: the eval loss on the
   held-out validation split (the built-in split, never trained on) after S steps ("equal steps"), and for the
   pruned variants also after round(keep_fraction * S) steps, i.e. the same number of epochs over their own data
   as the full run makes in S steps ("equal epochs", read from the eval curve). Variants:
   - ``plain_full``: the stock Trainer on all the data;
   - ``random``: a seeded random subset (Marion et al.'s baseline);
   - ``el2n_top``: keep the highest EL2N scores from a short proxy run (Paul et al.);
   - ``ppl_middle`` / ``ppl_top``: perplexity under a reference model, keep the middle / the highest (Marion et al.);
     the reference is an earlier run of the same model trained S steps on a random half of the data (its
     ``output_dir`` is passed as ``reference_model``). Scoring and reference costs are reported, not in the steps.
B. Selective backprop at equal wall time. The stock Trainer and selective backprop (beta 1 and 2) each train for
   the same wall-clock budget T; compared: fraction of examples backpropagated, median step time (after warm-up),
   steps done, and the eval loss on the validation split after T.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from hf_efftrain import Recipe
from hf_efftrain.build import build

WARMUP_STEPS = 3
KEEP = 0.6


class Clock(TrainerCallback):
    """Per-step times; stops training once ``budget_s`` of training time has passed."""

    def __init__(self, budget_s: float | None = None):
        self.budget_s, self.times, self.elapsed = budget_s, [], 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)
        self.elapsed += self.times[-1]
        if self.budget_s is not None and self.elapsed >= self.budget_s:
            control.should_training_stop = True


def make_recipe(out: Path, steps: int, techniques: list[dict], quick: bool, eval_steps: int | None) -> Recipe:
    data: dict[str, Any] = {"train": "builtin:stdlib-docs", "max_length": 64 if quick else 128}
    if quick:
        data.update(max_train_samples=192, max_eval_samples=48)
    training = {
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": 8 if quick else 16,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "eval_strategy": "steps" if eval_steps else "no",
    }
    if eval_steps:
        training["eval_steps"] = eval_steps
    return Recipe.parse(
        {"model": {"name_or_path": "builtin:tiny-llama"}, "data": data, "training": training, "techniques": techniques}
    )


def run(name: str, recipe: Recipe, plain: bool = False, budget_s: float | None = None, save: bool = False) -> dict:
    t0 = time.perf_counter()
    built = build(recipe)
    build_s = time.perf_counter() - t0
    if plain:  # the stock Trainer, no hf_efftrain code in the loop; only data prep shared
        trainer = built.plain_trainer()
    else:
        trainer = built.trainer
    clock = Clock(budget_s)
    trainer.add_callback(clock)
    trainer.train()
    curve = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    final = trainer.evaluate()["eval_loss"]
    curve[trainer.state.global_step] = final
    if save:
        trainer.save_model()
    reports = {t.name: t.report() for t in built.techniques}
    logging.getLogger(__name__).info("%s: eval loss %.4f after %d steps", name, final, trainer.state.global_step)
    return {
        "trainer": type(trainer).__name__,
        "train_examples": len(built.train_dataset),
        "steps": trainer.state.global_step,
        "build_s": build_s,
        "train_s": clock.elapsed,
        "step_time_s": statistics.median(clock.times[WARMUP_STEPS:] or clock.times),
        "eval_loss": final,
        "eval_curve": curve,
        "technique_report": reports,
    }


def pruning(a, tmp: Path) -> dict:
    steps, every = (20, 4) if a.quick else (a.steps, a.steps // 10)
    proxy = 10 if a.quick else 40
    mk = lambda name, tech: make_recipe(tmp / name, steps, tech, a.quick, every)  # noqa: E731
    prune = lambda **kw: [{"name": "data_pruning", "keep_fraction": KEEP, **kw}]  # noqa: E731
    ref = run(
        "reference",
        make_recipe(
            tmp / "reference", steps, prune(score="length", strategy="random", keep_fraction=0.5), a.quick, None
        ),
        save=True,
    )
    ppl = {"score": "perplexity", "reference_model": str(tmp / "reference")}
    variants = {
        "plain_full": (mk("plain_full", []), True),
        "random": (mk("random", prune(score="length", strategy="random")), False),
        "el2n_top": (mk("el2n_top", prune(score="el2n", strategy="top", proxy_steps=proxy)), False),
        "ppl_middle": (mk("ppl_middle", prune(**ppl, strategy="middle")), False),
        "ppl_top": (mk("ppl_top", prune(**ppl, strategy="top")), False),
    }
    results = {name: run(name, r, plain=plain) for name, (r, plain) in variants.items()}
    equal_epochs = round(KEEP * steps)
    for name, r in results.items():
        r["eval_loss_equal_steps"] = r["eval_loss"]
        r["eval_loss_equal_epochs"] = r["eval_curve"].get(equal_epochs) if name != "plain_full" else r["eval_loss"]
    return {
        "steps": steps,
        "eval_every": every,
        "equal_epochs_step": equal_epochs,
        "keep_fraction": KEEP,
        "reference": {k: ref[k] for k in ("train_examples", "steps", "train_s")},
        "variants": results,
    }


def selective(a, tmp: Path) -> dict:
    budget = 6.0 if a.quick else a.wall_s
    variants = {
        "plain_trainer": [],
        "sb_beta1": [{"name": "selective_backprop", "beta": 1.0}],
        "sb_beta2": [{"name": "selective_backprop", "beta": 2.0}],
    }
    out = {}
    for name, tech in variants.items():
        r = run(name, make_recipe(tmp / name, 100_000, tech, a.quick, None), plain=not tech, budget_s=budget)
        sb = r["technique_report"].get("selective_backprop", {})
        r["fraction_backpropagated"] = sb.get("fraction_backpropagated", 1.0)
        out[name] = r
    return {"wall_budget_s": budget, "variants": out}


def markdown(res: dict) -> str:
    p, s = res["pruning"], res["selective_backprop"]
    base = p["variants"]["plain_full"]["eval_loss"]
    lines = [
        f"## Data pruning at equal steps ({'quick' if res['quick'] else 'full'} mode)",
        "",
        f"tiny-llama, stdlib-docs, {p['steps']} steps for every variant, keep_fraction {p['keep_fraction']}; eval "
        f"loss on the held-out validation split. Equal epochs = the pruned run's eval loss at step "
        f"{p['equal_epochs_step']} (as many passes over its data as the full run makes in {p['steps']} steps).",
        "",
        "| variant | trainer | train examples | eval loss, equal steps | vs full | eval loss, equal epochs "
        "| build+score (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in p["variants"].items():
        ee = r["eval_loss_equal_epochs"]
        lines.append(
            f"| {name} | {r['trainer']} | {r['train_examples']} | {r['eval_loss']:.4f} | "
            f"{r['eval_loss'] - base:+.4f} | {'' if ee is None else f'{ee:.4f}'} | {r['build_s']:.1f} |"
        )
    lines += [
        "",
        f"Reference model for perplexity: the same model trained {p['reference']['steps']} steps on a random "
        f"{p['reference']['train_examples']} examples (not counted above).",
        "",
        f"## Selective backprop at equal wall time ({s['wall_budget_s']:.0f} s of training each)",
        "",
        "| variant | trainer | fraction backpropagated | step time (ms) | steps in budget | eval loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in s["variants"].items():
        lines.append(
            f"| {name} | {r['trainer']} | {r['fraction_backpropagated']:.3f} | {1e3 * r['step_time_s']:.1f} | "
            f"{r['steps']} | {r['eval_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run (results go to a temporary folder)")
    ap.add_argument("--steps", type=int, default=150, help="pruning: optimizer steps per variant")
    ap.add_argument("--wall-s", type=float, default=30.0, help="selective backprop: training seconds per variant")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = a.out or (
        Path(tempfile.mkdtemp(prefix="data_pruning_quick_")) if a.quick else Path("benchmarks/results/data_pruning")
    )
    tmp = Path(tempfile.mkdtemp(prefix="data_pruning_runs_"))
    try:
        res = {"quick": a.quick, "pruning": pruning(a, tmp), "selective_backprop": selective(a, tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the runs' output dirs: nothing there is kept
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    md = markdown(res)
    (out / "results.md").write_text(md)
    print(md)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
