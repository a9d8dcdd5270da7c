"""The user cache (tokenizer, built-in corpora, measured peak FLOP/s), written atomically.

Several processes (``accelerate launch``) may build the same entry at once: each writes into a private
temporary folder and renames it into place; the loser of the race discards its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """``$HF_EFFTRAIN_CACHE`` or ``$XDG_CACHE_HOME/hf_efftrain`` (default ``~/.cache/hf_efftrain``)."""
    root = os.environ.get("HF_EFFTRAIN_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_efftrain")
    path = Path(root, *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def cached_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, first calling ``build(tmp)`` to fill a temporary folder that is renamed to it."""
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: keep theirs
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
