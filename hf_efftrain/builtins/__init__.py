"""Offline ``builtin:`` models, tokenizer and datasets, so a first run needs no hub (docs/ARCHITECTURE.md, "Offline
built-ins"). A recipe names them as ``builtin:<name>`` in ``model.name_or_path`` and ``data.train``.
"""

from __future__ import annotations

from .chat_templates import CHAT_TEMPLATES, TEMPLATE_TOKENS
from .data import BUILTIN_DATASETS, PREFIX, load_builtin_dataset
from .models import BUILTIN_MODELS, builtin_config
from .tokenizer import get_tokenizer


def is_builtin(s: str) -> bool:
    """Whether a recipe value such as ``builtin:tiny-llama`` names a built-in (not a path or a hub id)."""
    return isinstance(s, str) and s.startswith(PREFIX)


def strip_builtin(s: str) -> str:
    """``builtin:tiny-llama`` -> ``tiny-llama``; a value without the prefix comes back unchanged."""
    return s[len(PREFIX) :] if is_builtin(s) else s


__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "CHAT_TEMPLATES",
    "PREFIX",
    "TEMPLATE_TOKENS",
    "builtin_config",
    "get_tokenizer",
    "is_builtin",
    "load_builtin_dataset",
    "strip_builtin",
]
