"""Load a recipe's data source (``builtin:``, a local file or folder, or a hub id) as a ``datasets.DatasetDict``,
and pick one of its splits. A source given as a mapping (``data.train: [{path, name, data_files, revision, ...}]``)
passes those to ``datasets.load_dataset`` (https://huggingface.co/docs/datasets/loading).

Hostile input (docs/FAULTS.md, "Input faults"): a file that cannot be read is a ``RecipeError`` naming the field and
the file; FIFOs and devices are refused without being opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

from ...builtins import is_builtin, load_builtin_dataset, strip_builtin
from ...errors import RecipeError
from .formats import is_turns

logger = logging.getLogger(__name__)

TURN_FIELDS = ("data.prompt_field", "data.response_field", "data.chosen_field", "data.rejected_field")

# Local file suffix -> `datasets` builder name.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_source(spec: str, path: str, **options):
    """Load ``spec`` as a ``datasets.DatasetDict``; ``path`` is the recipe field it came from (for errors).

    ``options`` (``name``, ``data_files``, ``revision``; None = not given) go to ``datasets.load_dataset`` for a hub
    id, a builder name (``json``, ``csv``, ...) or a folder of data files; a builtin or a single file has none.
    """
    import datasets

    options = {k: v for k, v in options.items() if v is not None}
    if is_builtin(spec):
        _refuse(options, path, "a builtin: dataset", "a hub id, a builder (json, csv, ...) or a folder does")
        data = load_builtin_dataset(strip_builtin(spec), path=path)
    elif Path(spec).exists():
        data = _load_local(Path(spec), path, options)
    elif Path(spec).suffix in FILE_BUILDERS or spec.startswith((".", "/", "~")):
        raise RecipeError(path, f"file not found: {spec}")
    else:
        try:
            with _datasets_quiet():
                data = datasets.load_dataset(spec, **options)
        except Exception as e:  # offline machines land here: say what would have worked
            if spec in FILE_BUILDERS.values():  # a packaged builder (json, csv...): the data_files are the problem
                files = options.get("data_files")
                raise RecipeError(
                    path, f"could not load {spec} data_files {files!r}: {_explain(Path(spec), e)}"
                ) from None
            raise RecipeError(
                path,
                f"{spec!r} is not a builtin: name, not a local file or folder, and could not be loaded "
                f"from the hub ({type(e).__name__}); allowed local suffixes: {', '.join(FILE_BUILDERS)}",
            ) from None
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict(train=data)
    if not any(len(split) for split in data.values()):
        raise RecipeError(path, f"dataset {spec!r} is empty")
    return data


def pick_split(data, split: str, path: str, spec: str):
    """``data[split]``, or an error naming the splits ``data`` has; ``path`` is the field that chose ``split``."""
    if split not in data:
        raise RecipeError(path, f"{split!r} not in {{{','.join(repr(s) for s in data)}}} (the splits of {spec})")
    if len(data[split]) == 0:
        raise RecipeError(path, f"split {split!r} of {spec!r} is empty")
    return data[split]


def describe(value) -> str:
    """``data.train`` / ``data.eval`` for a message: the string itself, or the paths of a list of sources."""
    return value if isinstance(value, str) or value is None else " + ".join(s.path for s in value)


def _refuse(options: dict, path: str, what: str, instead: str) -> None:
    """An option the source cannot use would be silently ignored: refuse the first one, naming its field."""
    for key in options:
        raise RecipeError(f"{path}.{key}", f"{what} takes no {key}; {instead}")


@contextlib.contextmanager
def _datasets_quiet() -> Iterator[None]:
    """`datasets` logs its own ERROR line for a file it cannot parse before raising; our RecipeError says it once."""
    import datasets

    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)


def _load_local(p: Path, path: str, options: dict):
    import datasets

    try:
        if p.is_dir():
            _require_regular_files(p, path)
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                _refuse(options, path, "a save_to_disk folder", "it holds its splits already")
                return datasets.load_from_disk(str(p))
            if not any(f.is_file() for f in p.rglob("*")):
                raise RecipeError(path, f"folder {str(p)!r} holds no data files ({', '.join(FILE_BUILDERS)})")
            _refuse(
                {k: v for k, v in options.items() if k == "revision"},
                path,
                "a local folder",
                "only a hub id has revisions",
            )
            with _datasets_quiet():  # data_files are relative to the folder; name picks a config of its README
                return datasets.load_dataset(str(p), **options)
        _require_regular_files(p, path)
        _refuse(options, path, "a single file", "give its folder as path (data_files are relative to it)")
        if p.stat().st_size == 0:
            raise RecipeError(path, f"dataset {str(p)!r} is empty")
        builder = FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise RecipeError(path, f"unsupported file type {p.suffix!r}; allowed: {', '.join(FILE_BUILDERS)}")
        with _datasets_quiet():
            return datasets.load_dataset(builder, data_files={"train": str(p)})
    except RecipeError:
        raise
    except Exception as e:  # malformed file: one line, not a traceback
        if "corresponds to no data" in str(e):  # `datasets`' words for a file with no rows ("[]", a bare header)
            raise RecipeError(path, f"dataset {str(p)!r} is empty (no rows)") from None
        raise RecipeError(path, f"could not read {p}: {_explain(p, e)}") from None


def _require_regular_files(p: Path, path: str) -> None:
    """A FIFO, socket or device (``/dev/zero``) as a data file would block or never end: refuse it up front."""
    for f in [p, *(p.rglob("*") if p.is_dir() else ())]:
        mode = f.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise RecipeError(path, f"{f} is not a regular file (a FIFO, socket or device); give a data file")


def _explain(p: Path, error: BaseException) -> str:
    """One line saying what is wrong with file ``p``: the first non-UTF-8 byte or broken JSON line when that is
    the cause, else the innermost error's first line (`datasets` wraps them in DatasetGenerationError)."""
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    if p.is_file() and p.suffix.lower() in (".json", ".jsonl", ".txt", ".csv"):
        found = _first_bad_line(p)
        if found:
            return found
    detail = (str(root).strip().splitlines() or [""])[0][:300]
    return f"{type(root).__name__}: {detail}".rstrip(": ")


def _first_bad_line(p: Path, limit: int = 1 << 30) -> str | None:
    """Scan a text data file (the first ``limit`` bytes) for bytes that are not UTF-8, and a JSON Lines file for a
    line that is not JSON; describe the first one found."""
    with p.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {number} is not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1})"
            if p.suffix.lower() == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"line {number} is not valid JSON ({e}); each line holds one JSON object"
            if f.tell() > limit:
                break
    if p.suffix.lower() == ".json":
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            return f"not valid JSON ({e})"
    return None


def require_columns(dataset, columns: dict[str, str], source: str) -> None:
    """``columns`` maps recipe field path -> column name; raise naming the field and the columns present, or when
    a text column holds something other than text (numbers, lists, mixed types; a prompt or response column may
    hold ``{role, content}`` turns)."""
    import datasets

    for field, column in columns.items():
        if column not in dataset.column_names:
            raise RecipeError(field, f"column {column!r} not in {source} (columns: {', '.join(dataset.column_names)})")
        if field == "data.messages_field":  # turns, checked when tokenized (formats.check_conversation_column)
            continue
        feature = dataset.features[column]
        is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        if field in TURN_FIELDS and is_turns(feature):
            continue  # TRL's conversational prompt-completion and preference (formats.py)
        if field not in ("data.label_field", "data.margin_field") and not is_text:  # labels, margins: checked later
            kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
            raise RecipeError(field, f"column {column!r} in {source} must hold text (strings), not {kind}")
