"""The matrix of ``hf-efftrain bench MATRIX.yaml``: its schema, loading, and the rows it composes (every run leaves
evidence: docs/ARCHITECTURE.md; the runs themselves: ``runner.py``; the comparison: ``compare.py``).

The survey (Zhuang et al. 2023, arXiv 2302.01107) judges a technique by what it saves against plain training on
the same model, data and budget. A matrix names a base recipe and the rows to compare. The first row is always
the ``baseline``: the stock ``transformers.Trainer`` (``Built.plain_trainer()``) on the base recipe without
techniques, so no hf_efftrain code is in its loop, only the data preparation. Every other row is the base recipe
(or its own recipe) plus techniques and ``--set`` overrides, run as ``python -m hf_efftrain train`` or, with an
``accelerate_config``, as ``accelerate launch --config_file ... -m hf_efftrain train``.

``prepare`` runs are trained once, before every row, with ``python -m hf_efftrain train`` (which saves the model):
a pre-trained base to fine-tune, a reference model to score data with. Any string of the base recipe, a row or a
later prepare run may hold ``{prepare.NAME}``: it becomes the folder that prepare run saved its model to (a row
whose prepare run failed is recorded as failed). ``report_fields`` adds columns read from each run's
``run_report.json``: a dotted path, where a list of named entries (``techniques``) is indexed by name.

```yaml
# hf-efftrain bench benchmarks/example.yaml
recipe: recipes/quickstart.yaml      # base recipe: a path (relative to the working directory or this file) or inline
set: [training.max_steps=60]         # overrides for every row, baseline included (not for prepare runs)
out: benchmarks/results/bench_example
repeats: 3
interleave: true                     # r1: A B C, r2: A B C (false: A A A, B B B, ...)
target_loss: null                    # default: the baseline's final smoothed loss
smoothing_window: 10                 # trailing mean over this many logged losses
quick: [training.max_steps=4]        # what --quick applies (and repeats 1), prepare runs included
baseline: {techniques: [{name: bf16}]}  # the stock Trainer in bf16 autocast (only TrainingArguments techniques)
prepare:                             # trained once before the rows; recipe: a path or inline (default: the base)
  - {name: base, recipe: recipes/pretrain.yaml, set: [training.max_steps=150]}
report_fields: [params_trainable, techniques.quantized_base.report.weight_bytes]
variants:
  - {name: lion, techniques: [{name: lion, lr: 3.0e-4}]}
  - {name: ddp_x2, accelerate_config: accelerate_configs/cpu_ddp.yaml}
  - {name: mine, recipe: recipes/other.yaml, set: [training.learning_rate=2e-3]}
  - {name: finetuned, set: ["model.name_or_path={prepare.base}"]}
  - name: pruned                     # a row's own `quick` comes after the matrix's
    techniques: [{name: sparse_training, start_step: 20}]
    quick: [techniques.sparse_training.start_step=1]
```
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import RecipeError

logger = logging.getLogger(__name__)

ROW_DEFAULTS = ("training.logging_steps=1", "training.disable_tqdm=true")  # one log per step: the curves
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$"
PREPARE_REF = re.compile(r"\{prepare\.([^{}]+)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaselineSpec(_Strict):
    name: str = Field("baseline", pattern=_NAME, description="row name of the stock-Trainer baseline")
    set: list[str] = Field(default_factory=list, description="--set overrides for the baseline only")
    techniques: list[dict[str, Any]] = Field(
        default_factory=list,
        description="techniques the stock Trainer can run itself (only TrainingArguments: bf16, fp16), e.g. a bf16 "
        "baseline; any other is refused when the baseline is built",
    )


class VariantSpec(_Strict):
    name: str = Field(pattern=_NAME, description="row name (also its folder name)")
    recipe: str | None = Field(None, description="a recipe YAML replacing the base recipe for this row")
    techniques: list[dict[str, Any]] = Field(default_factory=list, description="added to the recipe's techniques")
    set: list[str] = Field(default_factory=list, description="--set overrides for this row")
    accelerate_config: str | None = Field(None, description="run under accelerate launch --config_file this")
    quick: list[str] = Field(default_factory=list, description="--quick: overrides for this row, after the matrix's")


class PrepareSpec(_Strict):
    name: str = Field(pattern=_NAME, description="what {prepare.NAME} refers to (also its folder name)")
    recipe: str | dict[str, Any] | None = Field(None, description="a recipe YAML path or mapping; default: the base")
    techniques: list[dict[str, Any]] = Field(default_factory=list, description="added to the recipe's techniques")
    set: list[str] = Field(default_factory=list, description="--set overrides for this run")


class Matrix(_Strict):
    description: str = Field("", description="one line for the results page")
    recipe: str | dict[str, Any] = Field(description="base recipe: a YAML path or an inline mapping")
    set: list[str] = Field(default_factory=list, description="--set overrides for every row")
    out: str | None = Field(None, description="output folder; default runs/bench_<matrix file stem>")
    prepare: list[PrepareSpec] = Field(default_factory=list, description="runs trained once before the rows")
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    variants: list[VariantSpec] = Field(default_factory=list)
    report_fields: list[str] = Field(default_factory=list, description="extra columns: paths into run_report.json")
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
        prepared: set[str] = set()
        for i, p in enumerate(self.prepare):
            if p.name in prepared:
                raise ValueError(f"prepare[{i}].name: {p.name!r} is used twice")
            prepared.add(p.name)
        return self


@dataclass
class Row:
    name: str
    recipe: dict[str, Any] | None  # the composed recipe, None when it could not be composed
    plain: bool = False
    accelerate_config: str | None = None
    error: str | None = None
    needs: tuple[str, ...] = ()  # the prepare runs it refers to


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix YAML; every problem in one ``RecipeError`` naming the field."""
    from ..core.recipe import _format_errors

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


def resolve(path: str, matrix_dir: Path) -> Path:
    """A path as written (relative to the working directory), else relative to the matrix file."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else matrix_dir / p


def _read_recipe(source: str | dict[str, Any], matrix_dir: Path, field: str) -> dict[str, Any]:
    if isinstance(source, dict):
        return copy.deepcopy(source)
    file = resolve(source, matrix_dir)
    if not file.is_file():
        raise RecipeError(field, f"recipe file not found: {source}")
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise RecipeError(field, f"{source}: not a recipe mapping")
    return data


def fill_prepared(obj: Any, dirs: Mapping[str, str], used: set[str]) -> Any:
    """``obj`` with every ``{prepare.NAME}`` in its strings replaced by ``dirs[NAME]``; the names go into ``used``."""
    if isinstance(obj, str):

        def folder(m: re.Match) -> str:
            if m.group(1) not in dirs:
                known = ", ".join(dirs) or "none"
                raise RecipeError("prepare", f"{m.group(0)}: no prepare run of that name before it ({known})")
            used.add(m.group(1))
            return str(dirs[m.group(1)])

        return PREPARE_REF.sub(folder, obj)
    if isinstance(obj, dict):
        return {k: fill_prepared(v, dirs, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill_prepared(v, dirs, used) for v in obj]
    return obj


def _compose(data: dict[str, Any], head: list[str], techniques: list[dict[str, Any]] | None, tail: list[str],
             dirs: Mapping[str, str], used: set[str], baseline: bool = False) -> dict[str, Any]:  # fmt: skip
    """``data`` + ``head`` overrides + ``techniques`` + ``tail`` overrides, ``{prepare.NAME}`` filled in, validated;
    returned as written (a dump would set every default explicitly). The ``baseline`` runs only its own
    ``techniques`` (those the stock Trainer can run), none of the base recipe's."""
    from ..core.recipe import Recipe, apply_override

    data = fill_prepared(copy.deepcopy(data), dirs, used)
    data.setdefault("training", {}).setdefault("output_dir", "runs/bench")
    for item in head:
        apply_override(data, fill_prepared(item, dirs, used))
    if baseline:  # the stock Trainer: none of the base recipe's techniques
        if data.get("techniques"):
            logger.info("bench: the baseline drops the base recipe's techniques (it runs the stock Trainer)")
        data["techniques"] = fill_prepared(list(techniques or []), dirs, used)
    else:
        listed = {t.get("name"): t for t in data.get("techniques") or [] if isinstance(t, dict)}
        listed.update({t.get("name"): t for t in fill_prepared(techniques, dirs, used)})  # a row's entry wins
        data["techniques"] = list(listed.values())
    for item in tail:
        apply_override(data, fill_prepared(item, dirs, used))
    Recipe.parse(data)
    return data


def placeholder_dirs(matrix: Matrix) -> dict[str, str]:
    """What ``{prepare.NAME}`` becomes when no prepare run has a folder yet (composing only to validate)."""
    return {p.name: f"runs/bench_prepare/{p.name}" for p in matrix.prepare}


def compose_prepare(matrix: Matrix, matrix_path: str | Path, quick: bool = False,
                    dirs: Mapping[str, str] | None = None, overrides: Sequence[str] = ()) -> list[Row]:  # fmt: skip
    """The prepare runs as validated recipes; each may refer to the ones before it. A broken one is a
    ``RecipeError``: the rows that need it could not be compared. ``overrides`` (``bench --set``) come last."""
    matrix_dir, dirs = Path(matrix_path).parent, dict(dirs or placeholder_dirs(matrix))
    tail = [*(matrix.quick if quick else []), *overrides]
    rows = []
    for i, p in enumerate(matrix.prepare):
        used: set[str] = set()
        try:
            data = _read_recipe(p.recipe if p.recipe is not None else matrix.recipe, matrix_dir, f"prepare[{i}]")
            before = {q.name: dirs[q.name] for q in matrix.prepare[:i]}
            recipe = _compose(data, list(ROW_DEFAULTS), p.techniques, [*p.set, *tail], before, used)
        except RecipeError as e:
            raise RecipeError(f"prepare[{i}] ({p.name})" + (f" {e.path}" if e.path else ""), e.message) from None
        rows.append(Row(p.name, recipe, needs=tuple(sorted(used))))
    return rows


def compose_rows(matrix: Matrix, matrix_path: str | Path, quick: bool = False,
                 dirs: Mapping[str, str] | None = None, overrides: Sequence[str] = ()) -> list[Row]:  # fmt: skip
    """The baseline and every variant as validated recipe dicts (output_dir still to be set per run), with
    ``{prepare.NAME}`` filled in from ``dirs`` (default: placeholders, to validate before anything ran).

    A broken base recipe is a ``RecipeError`` (nothing could be compared); a broken variant becomes a ``Row`` with
    its ``error`` set, so the other rows still run. ``overrides`` (``bench --set``) apply to every row, last.
    """
    matrix_dir = Path(matrix_path).parent
    dirs = dict(dirs or placeholder_dirs(matrix))
    base = _read_recipe(matrix.recipe, matrix_dir, "recipe")
    head = [*ROW_DEFAULTS, *matrix.set]
    tail = list(matrix.quick) if quick else []
    used: set[str] = set()
    try:
        tail_b = [*matrix.baseline.set, *tail, *overrides]
        recipe = _compose(base, head, matrix.baseline.techniques, tail_b, dirs, used, baseline=True)
    except RecipeError as e:
        raise RecipeError("recipe" + (f" ({e.path})" if e.path else ""), e.message) from None
    rows = [Row(matrix.baseline.name, recipe, plain=True, needs=tuple(sorted(used)))]
    for i, v in enumerate(matrix.variants):
        field = f"variants[{i}]"
        row, used = Row(v.name, None), set()
        try:
            data = _read_recipe(v.recipe, matrix_dir, f"{field}.recipe") if v.recipe else base
            row_tail = [*v.set, *tail, *(v.quick if quick else []), *overrides]
            row.recipe = _compose(data, head, v.techniques, row_tail, dirs, used)
            row.needs = tuple(sorted(used))
            if v.accelerate_config:
                config = resolve(v.accelerate_config, matrix_dir)
                if not config.is_file():
                    raise RecipeError(f"{field}.accelerate_config", f"file not found: {v.accelerate_config}")
                row.accelerate_config = str(config)
        except RecipeError as e:
            row.error = f"{field} ({v.name}): {e}"
            logger.error("row %s cannot run: %s", v.name, row.error)
        rows.append(row)
    return rows
