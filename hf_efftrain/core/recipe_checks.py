"""Hostile-input guards for recipes (docs/FAULTS.md, "Input faults"): strict YAML reading, size, cycle and
number checks, and field paths that stay on one line whatever the keys are.

Everything here turns malformed input into a ``RecipeError`` naming the file or field, so that neither PyYAML's
nor Python's own exceptions (RecursionError, ValueError for a date like 2024-13-45) reach the user. Also here: the
``training`` fields that have one home elsewhere (``REFUSED_TRAINING``), ``model.attn_implementation``, checked
against what the installed transformers accepts, ``model.dtype`` bfloat16 on a CPU that emulates bf16 (a warning), and
``training.torch_compile`` with the technique settings it cannot train (``check_compile``).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import MissingDependencyError, RecipeError
from .technique import Env

logger = logging.getLogger(__name__)

# Hostile-input limits: torch and numpy hold integers in int64; a recipe is a small file of a few hundred values.
INT64_MAX = 2**63 - 1
MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_VALUES = 100_000


def check_size(data: Any, source: str) -> None:
    """Reject cyclic structures and alias bombs (YAML anchors that expand a few lines into billions of values)
    before anything walks them: count the values as the validators would see them, shared ones once per use."""
    memo: dict[int, int] = {}

    def count(value: Any, stack: set[int]) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        if id(value) in stack:
            raise RecipeError("recipe", f"{source}: refers to itself (a YAML alias inside its own anchor)")
        if id(value) not in memo:
            stack.add(id(value))
            children = value.values() if isinstance(value, dict) else value
            memo[id(value)] = 1 + sum(count(v, stack) for v in children)
            stack.discard(id(value))
        return memo[id(value)]

    try:
        n = count(data, set())
    except RecursionError:
        raise RecipeError("recipe", f"{source}: nested too deeply") from None
    if n > MAX_RECIPE_VALUES:
        raise RecipeError("recipe", f"{source}: expands to {n} values (YAML aliases?); at most {MAX_RECIPE_VALUES}")


def check_numbers(value: Any, path: str, errors: list[str]) -> None:
    """Integers beyond int64 fail deep inside torch, and nan/inf train on garbage: report them at their path."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and abs(value) > INT64_MAX:
        errors.append(f"{path}: out of range (got a {len(str(abs(value)))}-digit number); at most 2**63-1")
    elif isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{path}: must be a finite number (got {value})")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_numbers(item, key_path(path, key), errors)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_numbers(item, f"{path or 'recipe'}[{i}]", errors)


def key_path(prefix: str, key: Any) -> str:
    """``prefix.key``; a key that is not a plain name (empty, not a string, with dots or spaces) in brackets."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][\w-]*", key):
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix or 'recipe'}[{short(key)}]"


def short(value: Any, limit: int = 60) -> str:
    """``repr`` on one line, cut to ``limit`` characters (an error message must not echo a megabyte)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"<{len(str(abs(value)))}-digit number>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_per_path(errors: list[str]) -> list[str]:
    """One line per field path (a value can break several rules; the first one says enough)."""
    seen: dict[str, str] = {}
    for line in errors:
        seen.setdefault(line.split(": ", 1)[0], line)
    return list(seen.values())


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (plain PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node, deep=deep)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark
                        )
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; any problem (syntax, tabs, duplicate keys, bytes that are not UTF-8) is one RecipeError
    line naming the file, line and column."""
    try:
        return yaml.load(path.read_bytes().decode("utf-8"), Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as e:
        raise RecipeError(
            "recipe", f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r})"
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(e.problem or e.context or type(e).__name__).split())
        raise RecipeError("recipe", f"{path} is not valid YAML:{where}: {what}") from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError, OverflowError) as e:
        # e.g. a date that does not exist (2024-13-45), nesting deeper than Python's stack
        detail = " ".join(str(e).split())[:200]
        raise RecipeError("recipe", f"{path} is not valid YAML: {type(e).__name__} {detail}".rstrip()) from None


# ---- one knob per setting ----------------------------------------------------------------------------------
def _precision(dtype: str, full_eval: bool = False) -> str:
    entry = f"{{name: mixed_precision, dtype: {dtype}{', full_eval: true' if full_eval else ''}}}"
    return f"precision is the mixed_precision technique: remove this and add {entry} to techniques"


# TrainingArguments fields a recipe may not set, because a technique is their one home: field -> what to write.
REFUSED_TRAINING = {
    "bf16": _precision("bf16"),
    "fp16": _precision("fp16"),
    "bf16_full_eval": _precision("bf16", full_eval=True),
    "fp16_full_eval": _precision("fp16", full_eval=True),
}


def lion_replacement(optim: str) -> str | None:
    """For a ``TrainingArguments.optim`` Lion name (``lion_8bit``, ``paged_lion_32bit``, ...), the ``lion`` technique
    entry that builds the same optimizer; None for any other name."""
    if "lion" not in optim:
        return None
    fields = (", bits: 8" if "8bit" in optim else "") + (", paged: true" if optim.startswith("paged_") else "")
    return f"{{name: lion{fields}}}"


def fold_model_aliases(data: dict[str, Any], errors: list[str]) -> None:
    """A technique that is an alias of a ``model`` field (``Config.model_alias``: its field -> the model field, e.g.
    attention's implementation -> attn_implementation) writes its value there, so that the model field is the one
    place every hook reads. The two may both be given only when they agree."""
    model = data.get("model")
    if not isinstance(model, dict):
        return
    for i, cfg in enumerate(data["techniques"]):
        for field, target in getattr(type(cfg), "model_alias", {}).items():
            value, given = getattr(cfg, field), model.get(target)
            if given is None:
                model = data["model"] = {**model, target: value}
            elif given != value:
                errors.append(
                    f"techniques[{i}].{field}: {short(value)} but model.{target} is {short(given)}; {cfg.name} is an "
                    f"alias of model.{target}: set only that"
                )


# ---- model.attn_implementation: what the installed transformers accepts -------------------------------------
# Import name of the package each flash implementation loads (transformers.modeling_flash_attention_utils).
FLASH_PACKAGES = {
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn_interface",
    "flash_attention_4": "flash_attn",
}
PAGED = "paged|"


def attn_implementations() -> list[str]:
    """The registered names: ``eager`` and every key of ``transformers.AttentionInterface`` (its built-ins and
    whatever was registered at run time with ``AttentionInterface.register``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if k != "eager")]


def _base(name: str) -> str:
    # transformers strips a "paged|" prefix (except from "paged|eager", a registered name of its own).
    return name if name in attn_implementations() else name.removeprefix(PAGED)


def attn_implementation_problem(name: str) -> str | None:
    """Why ``from_pretrained(attn_implementation=name)`` would refuse ``name`` here, or None. Accepted as transformers
    accepts them: a registered name, ``paged|<registered>``, or a hub kernel ``org/repo[@revision][:function]`` (this
    one needs the ``kernels`` package; it is not downloaded here)."""
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.utils import is_kernels_available

    base = _base(name)
    if base in attn_implementations():
        return None
    if is_kernel(base):
        if is_kernels_available():
            return None
        return f"{name!r} is a hub kernel, which needs the 'kernels' package: pip install kernels"
    return (
        f"unknown attention implementation {short(name)}; allowed: {', '.join(attn_implementations())}, "
        f"{PAGED}<one of these>, or a hub kernel org/repo[@revision][:function] (needs the kernels package)"
    )


def check_attention_env(name: str | None, env: Env, path: str = "model.attn_implementation") -> None:
    """What a registered implementation needs from this machine: flash kernels a CUDA GPU and their package, flex
    attention a CUDA GPU (it has no backward pass on the CPU)."""
    base = _base(name or "sdpa")
    if base in FLASH_PACKAGES:
        if not env.cuda:
            raise RecipeError(path, f"{name} runs FlashAttention CUDA kernels and needs a CUDA GPU; use sdpa here")
        if FLASH_PACKAGES[base] not in env.installed:
            raise MissingDependencyError(path, FLASH_PACKAGES[base], "flash")
    if base == "flex_attention" and not env.cuda:
        raise RecipeError(path, "flex_attention has no backward pass on CPU; use sdpa or a GPU")


def check_dtype_env(recipe: Any, env: Env) -> None:
    """16-bit weights on a CPU that emulates bf16 matmuls: a warning (the bf16 techniques give their own)."""
    if recipe.model.dtype == "bfloat16" and not env.cuda and not env.cpu_bf16_native:
        if not {"bf16", "mixed_precision"} & set(recipe.technique_names()):
            from ..runtime.flops import cpu_description

            logger.warning(
                "model.dtype bfloat16: this CPU has no native bf16 matmuls (%s), so training computes in emulated "
                "bf16, many times slower than fp32; use model.dtype float32 here for speed.", cpu_description(),
            )  # fmt: skip


# ---- training.torch_compile -----------------------------------------------------------------------------------
# Every technique trains under torch.compile (tests/e2e/test_compile.py trains the ones that patch forwards, on the
# CPU with inductor, against the eager run). A technique that makes the run recompile without bound is refused here:
# dynamo compiles each function at most torch._dynamo.config.recompile_limit (8) times, then runs it uncompiled for
# the rest of the run, only warning in the log.


def compiles(training: dict[str, Any]) -> bool:
    """Whether the Trainer compiles the model: ``torch_compile``, or a backend or mode (either turns it on)."""
    return bool(training.get("torch_compile")) or any(
        training.get(k) is not None for k in ("torch_compile_backend", "torch_compile_mode")
    )


def _gradual_freezing(cfg: Any) -> bool:
    """layer_freezing freezes block after block, not all at one step (its schedule: start .. end)."""
    if cfg.start_step is not None and cfg.end_step is not None:
        return cfg.end_step > cfg.start_step
    if cfg.start_step is None and cfg.end_step is None and None not in (cfg.start_fraction, cfg.end_fraction):
        return cfg.end_fraction > cfg.start_fraction
    return True  # the default 0.25 .. 0.75 of max_steps, or a step and a fraction


def compile_problem(cfg: Any) -> str | None:
    """Why ``training.torch_compile`` cannot train with this technique entry, or None."""
    if cfg.name == "layer_freezing" and _gradual_freezing(cfg):
        return (
            "gradual freezing flips requires_grad block by block, and each freeze state is a new compiled graph of "
            "the whole model (requires_grad is part of dynamo's guards): past torch._dynamo's recompile limit (8) the "
            "model would silently run uncompiled; freeze at one step (start_step == end_step) or drop "
            "training.torch_compile"
        )
    return None


def check_compile(training: dict[str, Any], techniques: list[Any], errors: list[str]) -> None:
    """With ``training.torch_compile`` (or a compile backend/mode), refuse the techniques ``compile_problem`` names."""
    if not compiles(training):
        return
    for i, cfg in enumerate(techniques):
        problem = compile_problem(cfg)
        if problem:
            errors.append(f"techniques[{i}].name: {cfg.name} cannot run with training.torch_compile: {problem}")
