"""Hostile-input guards for recipes (docs/FAULTS.md, "Input faults"): strict YAML reading, size, cycle and
number checks, and field paths that stay on one line whatever the keys are.

Everything here turns malformed input into a ``RecipeError`` naming the file or field, so that neither PyYAML's
nor Python's own exceptions (RecursionError, ValueError for a date like 2024-13-45) reach the user.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

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
