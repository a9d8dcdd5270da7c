"""``train(recipe)``: build, train, evaluate, save, and leave the run report (docs/ARCHITECTURE.md, "The life
of a run"). ``run_report.json`` is written last and atomically, so a run killed part-way never leaves one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from .build import Built, build
from .recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)

REPORT_FILES = ("run_report.json", "loss.png", "README.md")  # README.md: the model card


def train(
    recipe: Recipe | str | Path,
    overrides: list[str] | None = None,
    output_dir: str | None = None,
    resume: bool | str | None = None,
) -> dict[str, Any]:
    """Run a recipe (a ``Recipe`` or a YAML path) end to end; return the run report.

    ``resume=True`` continues from the newest valid checkpoint in the output folder, or starts fresh with a warning
    when there is none yet (so one command serves a job's first start and its requeues); ``resume=PATH`` continues
    from that checkpoint, which must exist and verify. Default: the recipe's ``training.resume_from_checkpoint``.
    """
    from ..runtime.checkpoint import CheckpointError, latest_name, list_checkpoints, writing
    from ..runtime.distributed import check_engine, prepare_launch_env
    from ..runtime.metrics import build_run_report, plot_loss, write_run_report

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, output_dir)
    prepare_launch_env()  # a launch without CUDA becomes a CPU (gloo) group
    out = Path(recipe.output_dir)
    resume = recipe.training.get("resume_from_checkpoint") if resume is None else resume
    if isinstance(resume, str) and resume.lower() != "true" and not os.path.isdir(resume):  # before any work
        raise CheckpointError(f"no checkpoint folder at {resume}")
    built = build(recipe)
    check_engine(built.trainer)  # a ZeRO/FSDP launch line must not quietly train as plain DDP
    # Only now, with the recipe built: a recipe refused while building leaves an earlier run's report describing its
    # model; from here on a stale report must not describe this run, even if it dies early.
    if int(os.environ.get("RANK", "0")) == 0:
        with writing(f"the output folder {out}"):
            for name in REPORT_FILES:
                (out / name).unlink(missing_ok=True)
    trainer = built.trainer
    if resume is True and not list_checkpoints(str(out)):
        logger.warning("resume: no checkpoint in %s yet, starting from scratch", out)
        resume = None
    train_output = trainer.train(resume_from_checkpoint=resume)
    extra: dict[str, Any] = {"task": built.task, "output_dir": str(out), "recipe": recipe.to_dict()}
    extra["data"] = built.data_stats  # rows skipped (null/empty) and truncated, per split (docs/FAULTS.md)
    extra["model_config"] = built.model.config.to_dict()  # as trained (labels, overrides): what a merge reloads
    if built.eval_dataset is not None:
        extra["eval"] = trainer.evaluate()
    latest = latest_name(str(out))
    with writing(f"the final model and run report in {out}", latest and f"the last checkpoint {latest}", str(out)):
        trainer.save_model()
        report = build_run_report(trainer, train_output, built.techniques, mean_length(built), extra)
        if trainer.is_world_process_zero():
            (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            write_model_cards(out, recipe.to_dict(), report, adapter=hasattr(trainer.model, "peft_config"))
            plot_loss(trainer.state.log_history, out / "loss.png")
            write_run_report(out, report)  # last: its presence means the run finished
    return report


def write_model_cards(out: Path, recipe: dict[str, Any], report: dict[str, Any], adapter: bool) -> None:
    """README.md next to the saved weights (``adapter``: the Trainer saved a PEFT adapter, not the whole model),
    plus one in each merged folder a technique reports (``merged_model``)."""
    from ..runtime.model_card import write_model_card

    write_model_card(out, recipe, report, "adapter" if adapter else "full")
    for entry in report.get("techniques", []):
        merged = (entry.get("report") or {}).get("merged_model")
        if merged and Path(merged).is_dir():
            write_model_card(merged, recipe, report, "merged")


def mean_length(built: Built, sample: int = 2000) -> int:
    """Mean tokens per training example (real tokens, before padding), for FLOPs per token."""
    ds = built.train_dataset
    rows = ds.select(range(min(sample, len(ds))))["input_ids"]
    return max(1, round(sum(len(r) for r in rows) / max(1, len(rows))))
