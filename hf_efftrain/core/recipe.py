"""Recipe schema and loading: YAML -> validated ``Recipe`` (docs/ARCHITECTURE.md).

Sections ``model`` and ``data`` are pydantic models (unknown keys rejected); ``training`` holds any
``transformers.TrainingArguments`` field, each value checked against that field's type, except those with a
technique as their one home (``bf16``/``fp16``: ``mixed_precision``; Lion ``optim`` names: ``lion``); ``techniques``
is a list whose entries are validated by the named technique's own ``Config``. Every problem is reported as
``field.path: message`` in one ``RecipeError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, TypeAdapter, ValidationError

from ..errors import RecipeError
from .recipe_checks import (
    MAX_RECIPE_BYTES,
    REFUSED_TRAINING,
    StrictLoader,
    check_compile,
    check_numbers,
    check_size,
    first_per_path,
    fold_model_aliases,
    key_path,
    lion_replacement,
    read_yaml,
    short,
)
from .sections import DataSection, ModelSection, _Section
from .technique import TechniqueConfig

# Distributed settings belong to the accelerate config, so one recipe runs anywhere (docs/ARCHITECTURE.md).
_DISTRIBUTED_FIELDS = {"deepspeed", "fsdp", "fsdp_config", "local_rank", "ddp_backend", "parallelism_config"}
# Ranges TrainingArguments does not check itself: outside them a run crashes part-way (a zero batch, a seed numpy
# refuses) or trains on garbage (negative weight decay or clipping norm). field -> (lowest allowed, limit excluded).
TRAINING_RANGES: dict[str, tuple[float, float | None]] = {
    "per_device_train_batch_size": (1, None),
    "per_device_eval_batch_size": (1, None),
    "gradient_accumulation_steps": (1, None),
    "eval_accumulation_steps": (1, None),
    "learning_rate": (0, None),
    "weight_decay": (0, None),
    "max_grad_norm": (0, None),
    "adam_beta1": (0, 1),
    "adam_beta2": (0, 1),
    "adam_epsilon": (0, None),
    "label_smoothing_factor": (0, 1),
    "num_train_epochs": (0, None),
    "max_steps": (-1, None),
    "warmup_steps": (0, None),
    "logging_steps": (0, None),
    "save_steps": (0, None),
    "eval_steps": (0, None),
    "seed": (0, 2**32),
    "data_seed": (0, 2**32),
    "dataloader_num_workers": (0, None),
}


class Recipe(_Section):
    model: ModelSection
    data: DataSection
    training: dict[str, Any] = Field(default_factory=dict, description="transformers.TrainingArguments fields")
    techniques: list[SerializeAsAny[TechniqueConfig]] = Field(default_factory=list)

    @property
    def output_dir(self) -> str:
        return self.training.get("output_dir") or "trainer_output"  # TrainingArguments' own default

    def technique_names(self) -> list[str]:
        return [t.name for t in self.techniques]

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``parse`` reads back to the same recipe. Technique entries keep only the fields the user
        set (and the name): techniques reject fields that do not apply to their mode, even at default values."""
        data = self.model_dump(mode="json")
        data["techniques"] = [
            {"name": t.name, **t.model_dump(mode="json", exclude_unset=True)} for t in self.techniques
        ]
        return data

    @classmethod
    def parse(cls, data: Any, source: str = "recipe") -> Recipe:
        """Validate a plain dict (as loaded from YAML); raise one RecipeError listing every problem."""
        if not isinstance(data, dict):
            raise RecipeError(
                "recipe", f"{source}: a recipe is a mapping with sections model, data, training, techniques"
            )
        check_size(data, source)
        data = dict(data)
        errors: list[str] = []
        check_numbers(data, "", errors)
        data["training"] = _validate_training({} if data.get("training") is None else data["training"], errors)
        data["techniques"] = _validate_techniques([] if data.get("techniques") is None else data["techniques"], errors)
        fold_model_aliases(data, errors)
        if not errors:  # technique indices are the recipe's only when every entry validated
            check_compile(data["training"], data["techniques"], errors)
        try:
            recipe = cls.model_validate(data)
        except ValidationError as e:
            errors[:0] = _format_errors(e, cls)
            recipe = None
        if errors:
            raise RecipeError("", "\n".join(first_per_path(errors)))
        return recipe


# ---- training: TrainingArguments fields ---------------------------------------------------------------------
@functools.cache
def _training_fields() -> dict[str, TypeAdapter]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: TypeAdapter(hints[f.name]) for f in dataclasses.fields(TrainingArguments) if f.init}


def _validate_training(training: Any, errors: list[str]) -> dict[str, Any]:
    if not isinstance(training, dict):
        errors.append("training: must be a mapping of transformers.TrainingArguments fields")
        return {}
    fields, out = _training_fields(), {}
    for key, value in training.items():
        path = key_path("training", key)
        if key in _DISTRIBUTED_FIELDS:
            errors.append(
                f"{path}: distributed settings live in the accelerate config, not the recipe "
                "(accelerate launch --config_file accelerate_configs/<strategy>.yaml ...)"
            )
        elif key in REFUSED_TRAINING:
            errors.append(f"{path}: {REFUSED_TRAINING[key]}")
        elif key == "optim" and isinstance(value, str) and lion_replacement(value):
            errors.append(
                f"{path}: {short(value)} is Lion, which is the lion technique: remove this and add "
                f"{lion_replacement(value)} to techniques"
            )
        elif key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            errors.append(f"{path}: not a transformers.TrainingArguments field{hint}")
        else:
            try:
                out[key] = fields[key].validate_python(value)
            except ValidationError as e:
                errors.extend(f"{path}: {_message(err)}" for err in e.errors()[:1])
                continue
            problem = _out_of_range(out[key], *TRAINING_RANGES.get(key, (None, None)))
            if problem:
                errors.append(f"{path}: {problem}")
    return out


def _out_of_range(value: Any, low: float | None, limit: float | None) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or low is None:
        return None
    if value < low:
        return f"must be >= {low} (got {short(value)})"
    if limit is not None and value >= limit:
        return f"must be < {limit} (got {short(value)})"
    return None


# ---- techniques: each entry validated by its own Config -----------------------------------------------------
def _validate_techniques(entries: Any, errors: list[str]) -> list[TechniqueConfig]:
    from .registry import get_technique

    if not isinstance(entries, list):
        errors.append("techniques: must be a list of {name: ..., <options>}")
        return []
    out, seen = [], set()
    for i, entry in enumerate(entries):
        path = f"techniques[{i}]"
        if isinstance(entry, TechniqueConfig):
            entry = entry.model_dump()
        if not isinstance(entry, dict) or "name" not in entry:
            errors.append(f"{path}: each technique is a mapping with a 'name' key")
            continue
        if not isinstance(entry["name"], str):
            errors.append(
                f"{path}.name: must be a technique name, see `hf-efftrain techniques` (got {short(entry['name'])})"
            )
            continue
        try:
            config_cls = get_technique(entry["name"], f"{path}.name").Config
        except RecipeError as e:
            errors.append(str(e))
            continue
        if entry["name"] in seen:
            errors.append(f"{path}.name: technique {entry['name']!r} is listed twice")
        seen.add(entry["name"])
        try:
            out.append(config_cls.model_validate(entry))
        except ValidationError as e:
            errors.extend(_format_errors(e, config_cls, prefix=path))
    return out


# ---- error formatting ---------------------------------------------------------------------------------------
def _format_errors(e: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for err in e.errors():
        loc = list(err["loc"])
        if prefix == "" and loc[:1] == ["techniques"]:  # already validated one by one, with better paths
            continue
        path = prefix
        for part in loc:
            path = f"{path or 'recipe'}[{part}]" if isinstance(part, int) else key_path(path, part)
        msg = _message(err)
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model_cls, loc[:-1])
            msg = f"unknown field; allowed: {', '.join(allowed)}" if allowed else "unknown field"
        lines.append(f"{path}: {msg}")
    return lines


def _message(err: dict) -> str:
    ctx, kind = err.get("ctx", {}), err["type"]
    got = f" (got {short(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
    if isinstance(err.get("input"), bool) and kind in ("enum", "literal_error", "string_type"):
        got += "; YAML reads a bare yes/no/on/off as a boolean: quote it, e.g. 'no'"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        limit = f"{limit:g}" if isinstance(limit, float) else limit
        return f"must be {bounds[kind]} {limit}{got}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error" and "error" in ctx:  # a field validator's own message, without pydantic's prefix
        return " ".join(str(ctx["error"]).split())
    return " ".join(f"{err['msg']}{got}".split())  # one line


def _fields_at(model_cls: type[BaseModel], loc: list) -> list[str]:
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int):  # an item of a list field (data.train[1]): the item's model is already in cls
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return []
        cls = _model_type(cls.model_fields[part].annotation) if part in cls.model_fields else None
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _model_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_type(arg)
        if found is not None:
            return found
    return None


# ---- YAML and --set ----------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None) -> Recipe:
    """Read a recipe YAML, apply ``--set a.b=value`` overrides and ``--output-dir``, and validate it."""
    path = Path(path)
    if not path.exists():
        raise RecipeError("recipe", f"file not found: {path}")
    if not path.is_file():  # a folder, a FIFO or a device: reading it would fail or block forever
        raise RecipeError("recipe", f"{path} is not a regular file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError("recipe", f"{path} has {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
    data = read_yaml(path)
    if data is None:
        raise RecipeError("recipe", f"{path} is empty; a recipe is a mapping with sections model, data, training")
    if not isinstance(data, dict):
        raise RecipeError("recipe", f"{path}: a recipe is a mapping with sections model, data, training, techniques")
    for section, empty in (("training", {}), ("techniques", [])):
        if section in data and data[section] is None:  # `training:` with nothing under it
            data[section] = empty
    for item in overrides or []:
        apply_override(data, item)
    training = data.setdefault("training", {}) if isinstance(data.get("training", {}), dict) else None
    if training is not None:
        if output_dir:
            training["output_dir"] = output_dir
        training.setdefault("output_dir", str(Path("runs") / path.stem))
    return Recipe.parse(data, source=str(path))


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value``; ``techniques.<name>.<field>`` or ``techniques[i].<field>`` address a technique.

    The value is read as YAML (numbers, booleans, lists) except where the field it sets is a string.
    """
    if "=" not in item:
        raise RecipeError("--set", f"expected key.path=value, got {short(item)}")
    key, raw = item.split("=", 1)
    if not isinstance(data, dict):
        raise RecipeError("recipe", "a recipe is a mapping with sections model, data, training, techniques")
    parts = [p for p in key.replace("[", ".").replace("]", "").split(".") if p]
    if not parts:
        raise RecipeError("--set", f"empty key in {short(item)}")
    label = f"--set {key}" if re.fullmatch(r"[\w.\[\]-]+", key) else f"--set {short(key)}"
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, label)
        else:
            if not isinstance(node, dict):
                raise RecipeError(label, f"{'.'.join(parts[:i])} is not a mapping")
            node = node.setdefault(part, [] if part == "techniques" else {})
    value = raw if _expects_str(data, parts) else _yaml_value(raw)
    if isinstance(node, list):
        if parts[-1].isdigit() or not isinstance(value, dict):
            raise RecipeError(label, "set a technique's field: techniques.<name>.<field>=value")
        node.append(value)
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise RecipeError(label, f"{'.'.join(parts[:-1])} is not a mapping")


def _list_item(items: list, part: str, label: str) -> dict:
    if part.isdigit():
        if int(part) >= len(items):
            raise RecipeError(
                label, f"index out of range (got {short(int(part))}); the recipe has {len(items)} techniques"
            )
        return items[int(part)]
    for entry in items:
        if isinstance(entry, dict) and entry.get("name") == part:
            return entry
    items.append({"name": part})  # `--set techniques.lion.lr=1e-4` adds the technique when absent
    return items[-1]


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.load(raw, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError, OverflowError):  # not YAML: the literal string
        return raw


def _expects_str(data: dict, parts: list[str]) -> bool:
    """True when the addressed field's declared type is a string (so '123' or 'true' stay strings)."""
    if parts[0] in ("model", "data") and len(parts) == 2:
        cls = {"model": ModelSection, "data": DataSection}[parts[0]]
        field = cls.model_fields.get(parts[1])
        return field is not None and _only_str(field.annotation)
    if parts[0] == "training" and len(parts) == 2:
        from transformers import TrainingArguments

        hints = typing.get_type_hints(TrainingArguments)
        return parts[1] in hints and _only_str(hints[parts[1]])
    return False


def _only_str(annotation: Any) -> bool:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    args = [a for a in args if a is not type(None)]
    # A str Enum (save_strategy's IntervalStrategy, optim's OptimizerNames) takes its values as strings too.
    return bool(args) and all(isinstance(a, type) and issubclass(a, str) for a in args)
