"""Command line: ``hf-efftrain train | validate | techniques | bench | report | plan | merge``.

User errors (``RecipeError``) print one message and exit with 2, never a traceback. Training faults
(``checkpoint.TrainingFault``, docs/FAULTS.md) print one message too and exit with their own code:
EXIT_PREEMPTED (75, EX_TEMPFAIL: SIGTERM/SIGINT, a checkpoint was saved, rerun with ``--resume``), EXIT_DIVERGED (3:
divergence_guard gave up) and EXIT_IO_ERROR (74, EX_IOERR: a checkpoint or the run report could not be written).
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import EXIT_DIVERGED, EXIT_IO_ERROR, EXIT_PREEMPTED, EXIT_USER_ERROR
from .runtime.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-efftrain", description="Efficient training of Hugging Face models")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="recipe YAML")
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe field, e.g. training.max_steps=10 (repeatable)",
        )
        sp.add_argument("--output-dir", help="shortcut for --set training.output_dir=D")

    sp = sub.add_parser("train", help="train a model from a recipe")
    recipe_args(sp)
    sp.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="continue from the newest valid checkpoint in output_dir (fresh start, with a warning, if none yet), "
        "or from CHECKPOINT",
    )
    recipe_args(sub.add_parser("validate", help="check a recipe without training"))
    sub.add_parser("techniques", help="list the techniques")
    sp = sub.add_parser("bench", help="run a benchmark matrix: baseline (stock Trainer) and variants side by side")
    sp.add_argument("matrix", help="matrix YAML (format: hf_efftrain/bench/matrix.py)")
    sp.add_argument("--out", help="output folder (default: the matrix's `out`, else runs/bench_<matrix name>)")
    sp.add_argument("--repeats", type=int, help="runs of every row (default: the matrix's `repeats`)")
    sp.add_argument("--quick", action="store_true", help="smoke run: the matrix's `quick` overrides, 1 repeat")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override for every row and prepare run, applied last (repeatable)")  # fmt: skip
    sp = sub.add_parser("report", help="finished runs side by side: markdown table and plots")
    sp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders holding run_report.json")
    sp.add_argument("--out", default="runs/report", help="where results.md/json and the plots go")
    sp.add_argument("--baseline", help="run folder name the ratios are taken against (default: the first)")
    sp.add_argument("--target-loss", type=float, help="default: the baseline's final smoothed loss")
    sp.add_argument("--window", type=int, help="smoothing: trailing mean over this many logged losses (10)")
    sp = sub.add_parser("merge", help="merge a run's PEFT adapter into its base model (reloaded unquantized)")
    sp.add_argument("run_dir", metavar="RUN_DIR", help="output folder of a run with the peft technique")
    sp.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype of the reloaded base and of the merged weights (default auto: the checkpoint's)",
    )
    sp.add_argument("--out", help="where the merged model goes (default: RUN_DIR/merged)")
    from .plan.report import add_arguments as plan_arguments  # light import: no torch until a plan runs

    plan_arguments(sub.add_parser("plan", help="predict per-device training memory and the cheapest change to fit"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    from .errors import RecipeError
    from .runtime.checkpoint import Diverged, OutputWriteError, Preempted, TrainingFault

    try:
        commands = {"train": _train, "validate": _validate, "techniques": _techniques}
        commands.update(bench=_bench, report=_report, plan=_plan, merge=_merge)
        return commands[args.command](args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingFault as e:
        print(f"error: {e}", file=sys.stderr)
        return {Preempted: EXIT_PREEMPTED, Diverged: EXIT_DIVERGED, OutputWriteError: EXIT_IO_ERROR}[type(e)]


def _train(args) -> int:
    from .core.run import train
    from .runtime.metrics import summary_table

    report = train(args.recipe, args.overrides, args.output_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_table(report))
        print(f"run report: {os.path.join(report['output_dir'], 'run_report.json')}")
    return 0


def _validate(args) -> int:
    """A dry build (core/dry_run.py): every check ``train`` makes before its first step, no weights loaded."""
    from .core.dry_run import dry_build, example_lines
    from .core.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, args.output_dir)
    dry = dry_build(recipe)
    names = ", ".join(t.name for t in dry.techniques) or "none"
    rows = f"{len(dry.train_dataset)} train" + (f" + {len(dry.eval_dataset)} eval" if dry.eval_dataset else "")
    print(f"{args.recipe}: ok ({len(dry.techniques)} techniques: {names}; {dry.task}, {type(dry.model).__name__}, "
          f"{rows} examples)")  # fmt: skip
    print("example, data.train row 0: " + "\n".join(example_lines(dry)))
    for line in dry.unchecked:
        print(f"not checked without weights: {line}")
    return 0


def _bench(args) -> int:
    from .bench.runner import bench

    if args.repeats is not None and args.repeats < 1:
        from .errors import RecipeError

        raise RecipeError("--repeats", f"must be >= 1 (got {args.repeats})")
    results = bench(args.matrix, args.out, args.repeats, args.quick, args.overrides)
    print(results["table"])
    failed = sorted(results["errors"])
    print(f"results: {results['out']}/results.md" + (f" (failed: {', '.join(failed)})" if failed else ""))
    return 0


def _report(args) -> int:
    from .bench.runner import report

    results = report(args.run_dirs, args.out, args.baseline, args.target_loss, args.window)
    print(results["table"])
    print(f"results: {args.out}/results.md")
    return 0


def _plan(args) -> int:
    import json

    from .plan.report import plan_from_args, render

    plan = plan_from_args(args)
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0


def _merge(args) -> int:
    from .core.merge import merge_run

    print(f"merged model: {merge_run(args.run_dir, args.dtype, args.out)}")
    return 0


def _techniques(args) -> int:
    from .core.registry import all_techniques

    rows = [(name, cls.survey_section, cls.paper, cls.status()) for name, cls in all_techniques().items()]
    header = ("name", "survey section", "paper", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
