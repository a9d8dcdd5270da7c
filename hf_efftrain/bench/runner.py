"""Running a bench matrix (``matrix.py``): ``hf-efftrain bench MATRIX.yaml`` and ``hf-efftrain report RUN_DIR...``
(every run leaves evidence: docs/ARCHITECTURE.md).

Each run is a fresh subprocess (peak RSS is then the run's own): the baseline through this module's worker
(``python -m hf_efftrain.bench.runner baseline RECIPE``: the stock Trainer), every other row and every prepare run
as ``python -m hf_efftrain train`` (under ``accelerate launch`` with an ``accelerate_config``). The prepare runs
go first, once each, into a temporary folder that the rows' ``{prepare.NAME}`` point to; then the rows run
interleaved and repeated so machine noise hits them alike; a row that fails is recorded with its error and the
others still run. The figures come from each run's ``run_report.json`` and are compared by ``compare.py``
(results.json, results.md, plots).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from .matrix import Row, compose_prepare, compose_rows, load_matrix

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(row: Row, recipe_file: Path) -> list[str]:
    if row.plain:
        return [sys.executable, "-m", "hf_efftrain.bench.runner", "baseline", str(recipe_file)]
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
        [sys.executable, "-m", "hf_efftrain.bench.runner", "rss"], capture_output=True, text=True, env=_child_env()
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss"])


def planned_bytes(row: Row) -> int | None:
    """``hf-efftrain plan``'s predicted peak of one training process of this row, to set beside the measured one."""
    import torch

    from ..core.recipe import Recipe
    from ..plan.report import planned_process_bytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return planned_process_bytes(Recipe.parse(row.recipe), device, row.accelerate_config)
    except Exception as e:  # a side figure: a set-up the planner does not model must not stop the bench
        logger.warning("bench: no memory plan for %s (%s: %s)", row.name, type(e).__name__, e)
        return None


def _prepare(rows: list[Row], tmp: Path, keep: Path, timeout_s: float) -> tuple[dict[str, Any], list[str]]:
    """Train each prepare run once into ``tmp/<name>`` (what ``{prepare.NAME}`` points to); its log and report go
    to ``keep/<name>``. Returns what each one did (an ``error`` where it failed) and the lines for results.md."""
    done: dict[str, Any] = {}
    lines = []
    for row in rows:
        failed = [n for n in row.needs if done[n]["error"]]
        if failed:
            report, error = None, f"needs the failed prepare run {failed[0]!r}"
        else:
            report, error = run_row(row, tmp / row.name, keep / row.name, timeout_s)
        figures = {k: (report or {}).get(k) for k in ("steps", "wall_time_s", "train_loss_final", "eval_loss")}
        done[row.name] = {**figures, "error": error, "recipe": row.recipe}
        if error:
            logger.error("bench: prepare run %s failed: %s", row.name, error)
            lines.append(f"- Prepare run `{row.name}` failed: {error}")
        else:
            losses = [f"{k.replace('_', ' ')} {figures[k]:.4f}" for k in ("train_loss_final", "eval_loss")
                      if figures[k] is not None]  # fmt: skip
            losses.append(f"report in `prepare/{row.name}/`")
            lines.append(f"- Prepared once before the rows (not in the table): `{row.name}`, {figures['steps']} steps "
                         f"in {figures['wall_time_s'] or 0:.1f} s, {', '.join(losses)}.")  # fmt: skip
    return done, lines


def bench(
    matrix_path: str | Path,
    out: str | Path | None = None,
    repeats: int | None = None,
    quick: bool = False,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run a matrix; write results.json, results.md and plots into the out folder; return the results.
    ``overrides`` (``bench --set``) apply to every row and prepare run, after their own."""
    from ..runtime.flops import cpu_description
    from .compare import render

    matrix = load_matrix(matrix_path)
    compose_prepare(matrix, matrix_path, quick, overrides=overrides)  # a broken matrix stops here, before any run
    compose_rows(matrix, matrix_path, quick, overrides=overrides)
    if out is None:  # a --quick smoke run must not overwrite the matrix's real results
        out = Path(matrix.out or Path("runs") / f"bench_{Path(matrix_path).stem}") / ("quick" if quick else "")
    out = Path(out)
    repeats = 1 if quick else (repeats or matrix.repeats)
    log: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    rss_samples: list[int] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="hf_efftrain_bench_") as tmp:
        work = Path(tmp) / "_prepare"  # no row can be named so (names start with a letter or digit)
        dirs = {p.name: str(work / p.name) for p in matrix.prepare}
        prepare = compose_prepare(matrix, matrix_path, quick, dirs, overrides)
        prepared, prepare_notes = _prepare(prepare, work, out / "prepare", matrix.timeout_s)
        rows = compose_rows(matrix, matrix_path, quick, dirs, overrides)
        for row in rows:
            failed = [n for n in row.needs if prepared[n]["error"]]
            if failed and row.error is None:
                row.error = f"its prepare run {failed[0]!r} failed: {prepared[failed[0]]['error']}"
        runnable = [r for r in rows if r.error is None]
        planned = {r.name: planned_bytes(r) for r in runnable}  # after prepare: a row may load a prepared model
        order = [(k, r) for k in range(repeats) for r in runnable] if matrix.interleave else [
            (k, r) for r in runnable for k in range(repeats)
        ]  # fmt: skip
        errors = {r.name: r.error for r in rows if r.error}
        reports: dict[str, list[dict[str, Any]]] = {r.name: [] for r in rows}
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
        "overrides": list(overrides),
        "repeats": repeats,
        "interleave": matrix.interleave,
        "interrupted": interrupted,
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": cpu_description(),  # bf16 rows compare only between CPUs that both have (or lack) native bf16
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "prepare": prepared,
        "recipes": {r.name: r.recipe for r in rows},
        "accelerate_configs": {r.name: r.accelerate_config for r in rows if r.accelerate_config},
        "run_log": log,
    }
    title = f"hf-efftrain bench {matrix_path}" + (" --quick" if quick else "")
    title += "".join(f" --set {o}" for o in overrides)
    return render(reports, out, baseline=rows[0].name, window=matrix.smoothing_window, target=matrix.target_loss,
                  rss_base=rss_base, errors=errors, title=title, extra=extra, fields=matrix.report_fields,
                  extra_notes=prepare_notes)  # fmt: skip


def report(run_dirs: list[str], out: str | Path, baseline: str | None = None, target: float | None = None,
           window: int | None = None) -> dict[str, Any]:  # fmt: skip
    """``hf-efftrain report``: finished runs side by side, one row per folder. A folder holding ``run_report.json``
    is one run; a folder of such folders (a bench's ``runs/<row>``, repeats ``r0``, ``r1``, ...) is one row with
    repeats. Rows are named by folder (with the parent folder when names collide)."""
    from .compare import DEFAULT_WINDOW, REPORT_FILE, load_report, render

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
    from ..core.build import build
    from ..core.recipe import load_recipe
    from ..core.run import mean_length
    from ..runtime.distributed import prepare_launch_env
    from ..runtime.metrics import build_run_report, plot_loss, write_run_report

    recipe = load_recipe(recipe_path)
    prepare_launch_env()
    built = build(recipe)
    trainer = built.plain_trainer()  # refuses every technique that would put our code in the loop
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

        from ..core import build, run  # noqa: F401
        from ..core.registry import all_techniques
        from ..runtime import metrics  # noqa: F401

        all_techniques()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"rss": int(rss) * (1 if sys.platform == "darwin" else 1024)}))
        return 0
    if argv[:1] == ["baseline"] and len(argv) == 2:
        from ..errors import EXIT_USER_ERROR
        from ..runtime.logs import setup_logging

        setup_logging()
        try:
            train_plain(argv[1])
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    print("usage: python -m hf_efftrain.bench.runner rss | baseline RECIPE.yaml", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_worker(sys.argv[1:]))
