"""Technique registry: ``@register_technique`` on a Technique subclass makes its ``name`` usable in recipes."""

from __future__ import annotations

import importlib

from ..errors import RecipeError
from .technique import Technique

_REGISTRY: dict[str, type[Technique]] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator. The name must equal the module's last component (one name everywhere)."""
    module_name = cls.__module__.rsplit(".", 1)[-1]
    if cls.name != module_name:
        raise TypeError(f"technique {cls.__name__}.name={cls.name!r} must equal its module name {module_name!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"technique name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


# The built-in techniques live one layer above the core; importing the package by name registers each of them
# (techniques/__init__.py lists them) without a static import from the core upwards.
BUILTIN_TECHNIQUES = "hf_efftrain.techniques"


def _load() -> None:
    importlib.import_module(BUILTIN_TECHNIQUES)


def get_technique(name: str, path: str = "name") -> type[Technique]:
    _load()
    if name not in _REGISTRY:
        raise RecipeError(path, f"unknown technique {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_techniques() -> dict[str, type[Technique]]:
    _load()
    return dict(sorted(_REGISTRY.items()))
