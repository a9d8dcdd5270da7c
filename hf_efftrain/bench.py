"""Side-by-side benchmark runner: ``hf-efftrain bench MATRIX.yaml`` (DESIGN.md, "Every run leaves evidence").

The survey (Zhuang et al. 2023, arXiv 2302.01107) judges a technique by what it saves against plain training on
the same model, data and budget. A matrix names a base recipe and the rows to compare. The first row is always
the ``baseline``: the stock ``transformers.Trainer`` (``Built.plain_trainer()``) on the base recipe without
techniques, so no hf_efftrain code is in its loop, only the data preparation. Every other row is the base recipe
(or its own recipe) plus techniques and ``--set`` overrides, run as ``python -m hf_efftrain train`` or, with an
``accelerate_config``, as ``accelerate launch --config_file ... -m hf_efftrain train``.

Each run is a fresh subprocess (peak RSS is then the run's own), rows run interleaved and repeated so machine
noise hits them alike; a row that fails is recorded with its error and the others still run. The figures come
from each run's ``run_report.json`` and are compared by ``bench_report`` (results.json, results.md, plots).

```yaml
# hf-efftrain bench benchmarks/example.yaml
recipe: recipes/quickstart.yaml      # base recipe: a path (relative to the working directory or this file) or inline
set: [training.max_steps=60]         # overrides for every row, baseline included
out: benchmarks/results/bench_example
repeats: 3
interleave: true                     # r1: A B C, r2: A B C (false: A A A, B B B, ...)
target_loss: null                    # default: the baseline's final smoothed loss
smoothing_window: 10                 # trailing mean over this many logged losses
quick: [training.max_steps=4]        # what --quick applies (and repeats 1)
variants:
  - {name: lion, techniques: [{name: lion, lr: 3.0e-4}]}
  - {name: ddp_x2, accelerate_config: accelerate_configs/cpu_ddp.yaml}
  - {name: mine, recipe: recipes/other.yaml, set: [training.learning_rate=2e-3]}
```
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError

logger = logging.getLogger(__name__)

ROW_DEFAULTS = ("training.logging_steps=1", "training.disable_tqdm=true")  # one log per step: the curves
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaselineSpec(_Strict):
    name: str = Field("baseline", pattern=_NAME, description="row name of the stock-Trainer baseline")
    set: list[str] = Field(default_factory=list, description="--set overrides for the baseline only")


class VariantSpec(_Strict):
    name: str = Field(pattern=_NAME, description="row name (also its folder name)")
    recipe: str | None = Field(None, description="a recipe YAML replacing the base recipe for this row")
    techniques: list[dict[str, Any]] = Field(default_factory=list, description="added to the recipe's techniques")
    set: list[str] = Field(default_factory=list, description="--set overrides for this row")
    accelerate_config: str | None = Field(None, description="run under accelerate launch --config_file this")


class Matrix(_Strict):
    description: str = Field("", description="one line for the results page")
    recipe: str | dict[str, Any] = Field(description="base recipe: a YAML path or an inline mapping")
    set: list[str] = Field(default_factory=list, description="--set overrides for every row")
    out: str | None = Field(None, description="output folder; default runs/bench_<matrix file stem>")
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    variants: list[VariantSpec] = Field(default_factory=list)
    repeats: int = Field(1, ge=1, le=50, description="runs of every row")
    interleave: bool = Field(True, description="repeat the whole row list (true) or each row in a block (false)")
    target_loss: float | None = Field(None, description="default: the baseline's final smoothed loss")
    smoothing_window: int = Field(10, ge=1, description="trailing mean over this many logged train losses")
    quick: list[str] = Field(["training.max_steps=4"], description="--set overrides of --quick (repeats 1)")
    timeout_s: float = Field(1800, gt=0, description="a run taking longer is stopped and recorded as failed")

    @model_validator(mode="after")
    def _unique_names(self) -> Matrix:
        seen = {self.baseline.name}
        for i, v in enumerate(self.variants):
            if v.name in seen:
                raise ValueError(
                    f"variants[{i}].name: {v.name!r} is used twice (the baseline is {self.baseline.name!r})"
                )
            seen.add(v.name)
        return self


@dataclass
class Row:
    name: str
    recipe: dict[str, Any] | None  # the composed recipe, None when it could not be composed
    plain: bool = False
    accelerate_config: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------- matrix -> rows


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix YAML; every problem in one ``RecipeError`` naming the field."""
    from .recipe import _format_errors

    path = Path(path)
    if not path.is_file():
        raise RecipeError("matrix", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError("matrix", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError("matrix", f"{path}: a matrix is a mapping with keys {', '.join(Matrix.model_fields)}")
    try:
        return Matrix.model_validate(data)
    except ValidationError as e:
        lines = _format_errors(e, Matrix)
        lines = [line.replace("Value error, ", "").removeprefix(": ") for line in lines]  # validator: path inside
        raise RecipeError("", "\n".join(lines)) from None


def _resolve(path: str, matrix_dir: Path) -> Path:
    """A path as written (relative to the working directory), else relative to the matrix file."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else matrix_dir / p


def _read_recipe(path: str, matrix_dir: Path, field: str) -> dict[str, Any]:
    file = _resolve(path, matrix_dir)
    if not file.is_file():
        raise RecipeError(field, f"recipe file not found: {path}")
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise RecipeError(field, f"{path}: not a recipe mapping")
    return data


def compose_rows(matrix: Matrix, matrix_path: str | Path, quick: bool = False) -> list[Row]:
    """The baseline and every variant as validated recipe dicts (output_dir still to be set per run).

    A broken base recipe is a ``RecipeError`` (nothing could be compared); a broken variant becomes a ``Row`` with
    its ``error`` set, so the other rows still run.
    """
    from .recipe import Recipe, apply_override

    matrix_dir = Path(matrix_path).parent
    base = copy.deepcopy(matrix.recipe) if isinstance(matrix.recipe, dict) else None
    if base is None:
        base = _read_recipe(matrix.recipe, matrix_dir, "recipe")
    tail = list(matrix.quick) if quick else []

    def build(data: dict[str, Any], sets: list[str], techniques: list[dict[str, Any]] | None) -> dict[str, Any]:
        data = copy.deepcopy(data)
        data.setdefault("training", {}).setdefault("output_dir", "runs/bench")
        for item in [*ROW_DEFAULTS, *matrix.set]:
            apply_override(data, item)
        if techniques is None:  # the baseline: the stock Trainer, no technique
            if data.get("techniques"):
                logger.info("bench: the baseline drops the base recipe's techniques (it runs the stock Trainer)")
            data["techniques"] = []
        else:
            listed = {t.get("name"): t for t in data.get("techniques") or [] if isinstance(t, dict)}
            listed.update({t.get("name"): t for t in techniques})  # a row's entry replaces the recipe's one
            data["techniques"] = list(listed.values())
        for item in [*sets, *tail]:
            apply_override(data, item)
        Recipe.parse(data)  # validated here; passed on as written (a dump would set every default explicitly)
        return data

    try:
        baseline = Row(matrix.baseline.name, build(base, matrix.baseline.set, None), plain=True)
    except RecipeError as e:
        raise RecipeError("recipe" + (f" ({e.path})" if e.path else ""), e.message) from None
    rows = [baseline]
    for i, v in enumerate(matrix.variants):
        field = f"variants[{i}]"
        row = Row(v.name, None)
        try:
            data = _read_recipe(v.recipe, matrix_dir, f"{field}.recipe") if v.recipe else base
            row.recipe = build(data, v.set, v.techniques)
            if v.accelerate_config:
                config = _resolve(v.accelerate_config, matrix_dir)
                if not config.is_file():
                    raise RecipeError(f"{field}.accelerate_config", f"file not found: {v.accelerate_config}")
                row.accelerate_config = str(config)
        except RecipeError as e:
            row.error = f"{field} ({v.name}): {e}"
            logger.error("row %s cannot run: %s", v.name, row.error)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(row: Row, recipe_file: Path) -> list[str]:
    if row.plain:
        return [sys.executable, "-m", "hf_efftrain.bench", "baseline", str(recipe_file)]
    train = ["-m", "hf_efftrain", "train", str(recipe_file)]
    if row.accelerate_config:
        launch = ["-m", "accelerate.commands.launch", "--config_file", row.accelerate_config]
        return [sys.executable, *launch, "--main_process_port", str(_free_port()), *train]
    return [sys.executable, *train]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parents[1])  # children import this same source tree
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _error_of(log: str, rc: int) -> str:
    """The line that says what went wrong: the CLI's ``error:`` line, else the last exception line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return f"{line} (exit {rc})"
    return f"exit {rc}: {lines[-1] if lines else 'no output'}"


def run_row(row: Row, work: Path, keep: Path, timeout_s: float) -> tuple[dict[str, Any] | None, str | None]:
    """One run of a row in a fresh subprocess; its reports copied to ``keep``. (report, None) or (None, error)."""
    recipe = copy.deepcopy(row.recipe)
    recipe["training"]["output_dir"] = str(work)
    work.mkdir(parents=True, exist_ok=True)
    recipe_file = work.parent / f"{work.name}.recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    log_file = keep / "log.txt"
    keep.mkdir(parents=True, exist_ok=True)
    cmd = _command(row, recipe_file)
    logger.info("bench: %s: %s", row.name, " ".join(cmd[1:]))
    start = time.perf_counter()
    try:
        with log_file.open("w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    report_file = work / "run_report.json"
    if rc != 0 or not report_file.is_file():
        return None, _error_of(log_file.read_text(errors="replace"), rc)
    for name in ("run_report.json", "loss.png", "recipe.yaml"):
        if (work / name).is_file():
            shutil.copy2(work / name, keep / name)
    logger.info("bench: %s done in %.1f s", row.name, time.perf_counter() - start)
    return json.loads(report_file.read_text()), None


def import_rss() -> int:
    """Peak RSS (bytes) of a fresh process that imported what a run imports but built nothing: the base that
    ``RSS added`` is measured from."""
    out = subprocess.run(
        [sys.executable, "-m", "hf_efftrain.bench", "rss"], capture_output=True, text=True, env=_child_env()
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss"])


def planned_bytes(row: Row) -> int | None:
    """``hf-efftrain plan``'s predicted peak of one training process of this row, to set beside the measured one."""
    import torch

    from .plan_report import planned_process_bytes
    from .recipe import Recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return planned_process_bytes(Recipe.parse(row.recipe), device, row.accelerate_config)
    except Exception as e:  # a side figure: a set-up the planner does not model must not stop the bench
        logger.warning("bench: no memory plan for %s (%s: %s)", row.name, type(e).__name__, e)
        return None


def bench(
    matrix_path: str | Path, out: str | Path | None = None, repeats: int | None = None, quick: bool = False
) -> dict[str, Any]:
    """Run a matrix; write results.json, results.md and plots into the out folder; return the results."""
    from .bench_report import render

    matrix = load_matrix(matrix_path)
    rows = compose_rows(matrix, matrix_path, quick)
    if out is None:  # a --quick smoke run must not overwrite the matrix's real results
        out = Path(matrix.out or Path("runs") / f"bench_{Path(matrix_path).stem}") / ("quick" if quick else "")
    out = Path(out)
    repeats = 1 if quick else (repeats or matrix.repeats)
    runnable = [r for r in rows if r.error is None]
    planned = {r.name: planned_bytes(r) for r in runnable}
    order = [(k, r) for k in range(repeats) for r in runnable] if matrix.interleave else [
        (k, r) for r in runnable for k in range(repeats)
    ]  # fmt: skip
    errors = {r.name: r.error for r in rows if r.error}
    reports: dict[str, list[dict[str, Any]]] = {r.name: [] for r in rows}
    log: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    rss_samples: list[int] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="hf_efftrain_bench_") as tmp:
        for k, row in order:
            if row.name in errors:  # a failed row is not retried in later repeats
                continue
            started = time.time()
            try:
                if len(rss_samples) <= k:  # once per repeat, next to the runs it is the base of
                    rss_samples.append(import_rss())
                report, error = run_row(row, Path(tmp) / row.name / f"r{k}", out / "runs" / row.name / f"r{k}",
                                        matrix.timeout_s)  # fmt: skip
            except KeyboardInterrupt:  # Ctrl-C: stop, but still write what the finished runs measured
                logger.error("bench: interrupted; writing the results of the finished runs")
                interrupted = True
                break
            log.append({"row": row.name, "repeat": k, "started": started, "ok": error is None, "error": error})
            if error is not None:
                errors[row.name] = error
                logger.error("bench: %s (repeat %d) failed: %s", row.name, k + 1, error)
            else:
                reports[row.name].append({**report, "planned_peak_bytes": planned[row.name]})
    for row in rows:
        if not reports[row.name] and row.name not in errors:
            errors[row.name] = "not run (the bench was interrupted)"
    rss_base = sorted(rss_samples)[len(rss_samples) // 2] if rss_samples else None
    extra = {
        "matrix": str(matrix_path),
        "out": str(out),
        "description": matrix.description,
        "quick": quick,
        "repeats": repeats,
        "interleave": matrix.interleave,
        "interrupted": interrupted,
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "recipes": {r.name: r.recipe for r in rows},
        "accelerate_configs": {r.name: r.accelerate_config for r in rows if r.accelerate_config},
        "run_log": log,
    }
    title = f"hf-efftrain bench {matrix_path}" + (" --quick" if quick else "")
    return render(reports, out, baseline=rows[0].name, window=matrix.smoothing_window, target=matrix.target_loss,
                  rss_base=rss_base, errors=errors, title=title, extra=extra)  # fmt: skip


def report(run_dirs: list[str], out: str | Path, baseline: str | None = None, target: float | None = None,
           window: int | None = None) -> dict[str, Any]:  # fmt: skip
    """``hf-efftrain report``: finished runs side by side, one row per folder. A folder holding ``run_report.json``
    is one run; a folder of such folders (a bench's ``runs/<row>``, repeats ``r0``, ``r1``, ...) is one row with
    repeats. Rows are named by folder (with the parent folder when names collide)."""
    from .bench_report import DEFAULT_WINDOW, REPORT_FILE, load_report, render

    paths = [Path(d) for d in run_dirs]
    found: list[list[Path]] = []
    for i, path in enumerate(paths):
        runs = [path] if (path / REPORT_FILE).is_file() else sorted(p.parent for p in path.glob(f"*/{REPORT_FILE}"))
        if not runs:
            raise RecipeError(f"RUN_DIR[{i}]", f"{path}: no {REPORT_FILE} here or one level down (not a finished run)")
        found.append(runs)
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    rows = {name: [load_report(r) for r in runs] for name, runs in zip(names, found, strict=True)}
    if baseline is not None and baseline not in rows:
        raise RecipeError("--baseline", f"{baseline!r} is not one of the runs: {', '.join(rows)}")
    return render(rows, out, baseline=baseline or names[0], window=window or DEFAULT_WINDOW, target=target,
                  title="hf-efftrain report " + " ".join(run_dirs))  # fmt: skip


# ------------------------------------------------------------------------------------- subprocess entry points


def train_plain(recipe_path: str) -> dict[str, Any]:
    """The baseline run: the stock ``transformers.Trainer`` from ``Built.plain_trainer()``, with the same
    evaluation, report and plot as ``run.train`` (which drives the EffTrainer)."""
    from .build import build
    from .distributed import prepare_launch_env
    from .metrics import build_run_report, plot_loss, write_run_report
    from .recipe import load_recipe
    from .run import mean_length

    recipe = load_recipe(recipe_path)
    if recipe.techniques:
        raise RecipeError("techniques", "the baseline is the stock Trainer: it takes no techniques")
    prepare_launch_env()
    built = build(recipe)
    trainer = built.plain_trainer()
    train_output = trainer.train()
    extra: dict[str, Any] = {"task": built.task, "output_dir": recipe.output_dir, "recipe": recipe.to_dict()}
    extra["trainer"] = f"{type(trainer).__module__}.{type(trainer).__name__}"
    if built.eval_dataset is not None:
        extra["eval"] = trainer.evaluate()
    report = build_run_report(trainer, train_output, [], mean_length(built), extra)
    if trainer.is_world_process_zero():
        plot_loss(trainer.state.log_history, Path(recipe.output_dir) / "loss.png")
        write_run_report(recipe.output_dir, report)
    return report


def _worker(argv: list[str]) -> int:
    if argv[:1] == ["rss"]:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import Trainer, TrainingArguments  # noqa: F401

        from . import build, metrics, run  # noqa: F401
        from .registry import all_techniques

        all_techniques()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"rss": int(rss) * (1 if sys.platform == "darwin" else 1024)}))
        return 0
    if argv[:1] == ["baseline"] and len(argv) == 2:
        from .cli import EXIT_USER_ERROR, _setup_logging

        _setup_logging()
        try:
            train_plain(argv[1])
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    print("usage: python -m hf_efftrain.bench rss | baseline RECIPE.yaml", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_worker(sys.argv[1:]))
