"""Command line: ``hf-efftrain train | validate | techniques``.

User errors (``RecipeError``) print one message and exit with 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_USER_ERROR = 2


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

    recipe_args(sub.add_parser("train", help="train a model from a recipe"))
    recipe_args(sub.add_parser("validate", help="check a recipe without training"))
    sub.add_parser("techniques", help="list the techniques")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    from .errors import RecipeError

    try:
        return {"train": _train, "validate": _validate, "techniques": _techniques}[args.command](args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO if rank == 0 else 60)
    # bitsandbytes warns at import that its optional `kernels` package is missing; its CPU paths work without it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()


def _train(args) -> int:
    from .metrics import summary_table
    from .run import train

    report = train(args.recipe, args.overrides, args.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_table(report))
        print(f"run report: {os.path.join(report['output_dir'], 'run_report.json')}")
    return 0


def _validate(args) -> int:
    from .build import make_techniques
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, args.output_dir)
    techniques = make_techniques(recipe)
    print(f"{args.recipe}: ok ({len(techniques)} techniques: {', '.join(t.name for t in techniques) or 'none'})")
    return 0


def _techniques(args) -> int:
    from .registry import all_techniques

    rows = [(name, cls.survey_section, cls.paper, cls.status()) for name, cls in all_techniques().items()]
    header = ("name", "survey section", "paper", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
