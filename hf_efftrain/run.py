"""``train(recipe)``: build, train, evaluate, save, and leave the run report (DESIGN.md, "Every run leaves
evidence"). ``run_report.json`` is written last and atomically, so a run killed part-way never leaves one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from .build import Built, build
from .recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)

REPORT_FILES = ("run_report.json", "loss.png")


def train(
    recipe: Recipe | str | Path, overrides: list[str] | None = None, output_dir: str | None = None
) -> dict[str, Any]:
    """Run a recipe (a ``Recipe`` or a YAML path) end to end; return the run report."""
    from .metrics import build_run_report, plot_loss, write_run_report

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, output_dir)
    use_cpu_when_launched_without_gpu()
    out = Path(recipe.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        for name in REPORT_FILES:  # a stale report must not describe this run, even if it dies early
            (out / name).unlink(missing_ok=True)
    built = build(recipe)
    trainer = built.trainer
    train_output = trainer.train(resume_from_checkpoint=built.args.resume_from_checkpoint)
    extra: dict[str, Any] = {"task": built.task, "output_dir": str(out), "recipe": recipe.to_dict()}
    if built.eval_dataset is not None:
        extra["eval"] = trainer.evaluate()
    trainer.save_model()
    report = build_run_report(trainer, train_output, built.techniques, mean_length(built), extra)
    if trainer.is_world_process_zero():
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        plot_loss(trainer.state.log_history, out / "loss.png")
        write_run_report(out, report)  # last: its presence means the run finished
    return report


def use_cpu_when_launched_without_gpu() -> None:
    """Under ``accelerate launch`` on a machine without CUDA, run the processes as a CPU (gloo) group.

    Accelerate's multi-process launcher starts the processes but they only form a CPU group when told it is a
    CPU run; telling them here lets one launch line and config serve both GPU and CPU machines.
    """
    import torch

    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def mean_length(built: Built, sample: int = 2000) -> int:
    """Mean tokens per training example (real tokens, before padding), for FLOPs per token."""
    ds = built.train_dataset
    rows = ds.select(range(min(sample, len(ds))))["input_ids"]
    return max(1, round(sum(len(r) for r in rows) / max(1, len(rows))))
