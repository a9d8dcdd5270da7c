"""Data for a recipe: load a source (builtin, local file or folder, hub id), tokenize it for the task, collate.

Tasks: ``causal_lm`` (labels = inputs), ``sft`` (loss on the response only: prompt labels are -100),
``masked_lm`` (BERT-style masking in the collator), ``seq2seq`` (prompt -> response) and ``classification``.

Hostile input (docs/FAULTS.md, "Input faults"): a file that cannot be read, a text column that is not text or a
label column with fewer than two classes is a ``RecipeError`` naming the field and the file. Rows whose text is
null or empty (no tokens to learn from) are skipped, and rows longer than ``data.max_length`` are truncated; both
are counted, logged, and returned in ``stats`` (the run report's ``data`` entry).
"""

from __future__ import annotations

import contextlib
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..builtins import is_builtin, load_builtin_dataset, strip_builtin
from ..errors import RecipeError

logger = logging.getLogger(__name__)

# Local file suffix -> `datasets` builder name.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Template for SFT prompts: the loss only covers what follows it.
SFT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"
# Class ids name the rows of the classifier head: an id of 10**9 would allocate a billion-row head.
MAX_CLASSES = 100_000


def load_source(spec: str, path: str):
    """Load ``spec`` as a ``datasets.DatasetDict``; ``path`` is the recipe field it came from (for errors)."""
    import datasets

    if is_builtin(spec):
        data = load_builtin_dataset(strip_builtin(spec), path=path)
    elif Path(spec).exists():
        data = _load_local(Path(spec), path)
    elif Path(spec).suffix in FILE_BUILDERS or spec.startswith((".", "/", "~")):
        raise RecipeError(path, f"file not found: {spec}")
    else:
        try:
            data = datasets.load_dataset(spec)
        except Exception as e:  # offline machines land here: say what would have worked
            raise RecipeError(
                path,
                f"{spec!r} is not a builtin: name, not a local file or folder, and could not be loaded "
                f"from the hub ({type(e).__name__}); allowed local suffixes: {', '.join(FILE_BUILDERS)}",
            ) from None
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict(train=data)
    if "train" not in data or len(data["train"]) == 0:
        raise RecipeError(path, f"dataset {spec!r} is empty")
    return data


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


def _load_local(p: Path, path: str):
    import datasets

    try:
        if p.is_dir():
            _require_regular_files(p, path)
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                return datasets.load_from_disk(str(p))
            if not any(f.is_file() for f in p.rglob("*")):
                raise RecipeError(path, f"folder {str(p)!r} holds no data files ({', '.join(FILE_BUILDERS)})")
            with _datasets_quiet():
                return datasets.load_dataset(str(p))
        _require_regular_files(p, path)
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
    a text column holds something other than text (numbers, lists, mixed types)."""
    import datasets

    for field, column in columns.items():
        if column not in dataset.column_names:
            raise RecipeError(field, f"column {column!r} not in {source} (columns: {', '.join(dataset.column_names)})")
        feature = dataset.features[column]
        is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        if field != "data.label_field" and not is_text:
            kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
            raise RecipeError(field, f"column {column!r} in {source} must hold text (strings), not {kind}")


def task_columns(task: str, data_cfg, columns: list[str] | None = None) -> dict[str, str]:
    """Recipe field path -> column that ``task`` needs. A seq2seq source with only a text column is plain text
    (input = target), for denoising objectives that build their own targets (token_masking's span mode)."""
    if task == "seq2seq" and columns is not None and data_cfg.prompt_field not in columns:
        if data_cfg.text_field in columns:
            return {"data.text_field": data_cfg.text_field}
    if task in ("sft", "seq2seq"):
        return {"data.prompt_field": data_cfg.prompt_field, "data.response_field": data_cfg.response_field}
    if task == "classification":
        return {"data.text_field": data_cfg.text_field, "data.label_field": data_cfg.label_field}
    return {"data.text_field": data_cfg.text_field}


def tokenize(dataset, task: str, tokenizer, data_cfg, split: str = "data.train", stats: dict | None = None):
    """Tokenize one split for ``task``; keeps only model inputs (input_ids, attention_mask, labels).

    Rows with nothing to learn from (null or empty text; for SFT a response cut off by ``max_length``) are
    dropped and rows longer than ``data.max_length`` truncated; the counts are logged and, when ``stats`` is
    given, stored in it under ``split``.
    """
    fn = {
        "causal_lm": _causal_lm,
        "sft": _sft,
        "seq2seq": _seq2seq,
        "masked_lm": _masked_lm,
        "classification": _classification,
    }[task]
    source = getattr(data_cfg, split.split(".", 1)[-1], None) or data_cfg.train
    try:
        out = dataset.map(
            fn,
            batched=True,
            remove_columns=dataset.column_names,
            fn_kwargs={"tok": tokenizer, "cfg": data_cfg},
            desc=f"tokenize ({task})",
        )
    except UnicodeDecodeError as e:  # JSON/CSV readers keep invalid bytes; they surface when the text is read
        where = _first_bad_line(Path(source)) if Path(source).is_file() else None
        raise RecipeError(split, f"{source}: {where or f'text is not UTF-8 ({e.reason} at byte {e.start})'}") from None
    counts = {
        "rows": len(out),
        "skipped_empty": sum(out["_skip"]),
        "truncated": sum(out["_truncated"]),
        "max_length": data_cfg.max_length,
    }
    out = out.filter(lambda skip: not skip, input_columns="_skip", desc="drop empty rows")
    out = out.remove_columns(["_skip", "_truncated"])
    if counts["skipped_empty"] or counts["truncated"]:
        logger.info(
            "%s: %d of %d rows skipped (null or empty text, nothing to learn within data.max_length), "
            "%d truncated to data.max_length=%d tokens",
            split,
            counts["skipped_empty"],
            counts["rows"],
            counts["truncated"],
            data_cfg.max_length,
        )
    if stats is not None:
        stats[split] = counts
    if len(out) == 0:
        raise RecipeError(
            split, f"no example left in {source}: all {counts['rows']} rows are null or empty after tokenization"
        )
    return out


def _ids(tok, texts: list[str | None], max_length: int) -> list[list[int]]:
    # Truncating here (not only after) keeps long documents cheap and the tokenizer's length warning quiet; one
    # token more than fits tells the callers which rows were cut. A null or blank cell is an empty row (skipped).
    texts = ["" if t is None or t.isspace() else t for t in texts]
    return tok(texts, add_special_tokens=False, truncation=True, max_length=max_length + 1)["input_ids"]


def _flags(rows: list[list[int]], content: list[int], full: list[int], max_length: int) -> dict[str, list[bool]]:
    """Per row: ``_skip`` when it has no content token or fewer than two tokens in all, ``_truncated`` when its
    untruncated length ``full`` was over ``max_length``."""
    return {
        "_skip": [n == 0 or len(r) < 2 for r, n in zip(rows, content)],
        "_truncated": [f > max_length for f in full],
    }


def _wrap(ids: list[int], first: int | None, last: int | None, max_length: int) -> list[int]:
    head = [first] if first is not None else []
    tail = [last] if last is not None else []
    return head + ids[: max_length - len(head) - len(tail)] + tail


def _n_special(*ids: int | None) -> int:
    return sum(i is not None for i in ids)


def _causal_lm(batch, tok, cfg):
    ids = _ids(tok, batch[cfg.text_field], cfg.max_length)
    rows = [_wrap(i, tok.bos_token_id, tok.eos_token_id, cfg.max_length) for i in ids]
    extra = _n_special(tok.bos_token_id, tok.eos_token_id)
    return {
        "input_ids": rows,
        "attention_mask": [[1] * len(r) for r in rows],
        "labels": [list(r) for r in rows],
        **_flags(rows, [len(i) for i in ids], [len(i) + extra for i in ids], cfg.max_length),
    }


def _sft(batch, tok, cfg):
    prompts = _ids(
        tok, [None if p is None else SFT_TEMPLATE.format(prompt=p) for p in batch[cfg.prompt_field]], cfg.max_length
    )
    responses = _ids(tok, batch[cfg.response_field], cfg.max_length)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "_skip": [], "_truncated": []}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for p, r in zip(prompts, responses):
        prompt, response = bos + p, r + eos
        ids = (prompt + response)[: cfg.max_length]
        labels = ([-100] * len(prompt) + response)[: cfg.max_length]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        # No prompt or no response, or a prompt that fills max_length: no token carries a loss.
        out["_skip"].append(not p or not r or len(prompt) >= cfg.max_length)
        out["_truncated"].append(len(prompt) + len(response) > cfg.max_length)
    return out


def _seq2seq(batch, tok, cfg):
    source, target = (cfg.prompt_field, cfg.response_field) if cfg.prompt_field in batch else (cfg.text_field,) * 2
    src, tgt = _ids(tok, batch[source], cfg.max_length), _ids(tok, batch[target], cfg.max_length)
    inputs = [_wrap(i, None, tok.eos_token_id, cfg.max_length) for i in src]
    labels = [_wrap(i, None, tok.eos_token_id, cfg.max_length) for i in tgt]
    extra = _n_special(tok.eos_token_id)
    return {
        "input_ids": inputs,
        "attention_mask": [[1] * len(r) for r in inputs],
        "labels": labels,
        "_skip": [not s or not t for s, t in zip(src, tgt)],
        "_truncated": [max(len(s), len(t)) + extra > cfg.max_length for s, t in zip(src, tgt)],
    }


def _encoder_ids(tok, texts, max_length) -> tuple[list[list[int]], dict[str, list[bool]]]:
    first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    last = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    ids = _ids(tok, texts, max_length)
    rows = [_wrap(i, first, last, max_length) for i in ids]
    extra = _n_special(first, last)
    return rows, _flags(rows, [len(i) for i in ids], [len(i) + extra for i in ids], max_length)


def _masked_lm(batch, tok, cfg):
    rows, flags = _encoder_ids(tok, batch[cfg.text_field], cfg.max_length)
    specials = set(tok.all_special_ids)
    return {
        "input_ids": rows,
        "attention_mask": [[1] * len(r) for r in rows],
        "special_tokens_mask": [[int(i in specials) for i in r] for r in rows],
        **flags,
    }


def _classification(batch, tok, cfg):
    rows, flags = _encoder_ids(tok, batch[cfg.text_field], cfg.max_length)
    return {
        "input_ids": rows,
        "attention_mask": [[1] * len(r) for r in rows],
        "labels": batch[cfg.label_field],
        **flags,
    }


def encode_labels(dataset_dict, label_field: str):
    """Make the label column integer class ids; return (dataset_dict, class names)."""
    import datasets

    feature = dataset_dict["train"].features[label_field]
    integer = isinstance(feature, datasets.Value) and (
        feature.dtype.startswith(("int", "uint")) or feature.dtype == "bool"
    )
    text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not (isinstance(feature, datasets.ClassLabel) or integer or text):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise RecipeError(
            "data.label_field",
            f"column {label_field!r} must hold class ids (integers) or class names (strings), not {kind}",
        )
    for split in list(dataset_dict):  # a row without a label cannot be learned from: skip it, counted
        before = len(dataset_dict[split])
        dataset_dict[split] = dataset_dict[split].filter(lambda v: v is not None, input_columns=label_field)
        if len(dataset_dict[split]) < before:
            skipped = before - len(dataset_dict[split])
            logger.info("data.%s: %d of %d rows skipped (null %s)", split, skipped, before, label_field)
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif text:
        names = sorted({str(v) for split in dataset_dict.values() for v in split[label_field]})
        dataset_dict = dataset_dict.cast_column(label_field, datasets.ClassLabel(names=names))
    else:
        values = sorted({int(v) for split in dataset_dict.values() for v in split[label_field]})
        if values and (values[0] < 0):
            raise RecipeError("data.label_field", f"labels must be >= 0 class ids or strings (got {values[0]})")
        if values and values[-1] >= MAX_CLASSES:
            raise RecipeError("data.label_field", f"class id {values[-1]} is too large; ids are 0..{MAX_CLASSES - 1}")
        names = [str(i) for i in range((values[-1] + 1) if values else 0)]
    if len(names) > MAX_CLASSES:
        raise RecipeError("data.label_field", f"{len(names)} classes; at most {MAX_CLASSES}")
    train = dataset_dict["train"]
    present = sorted(set(train[label_field]))
    if len(present) < 2:
        shown = ", ".join(names[int(i)] for i in present) or "none"
        raise RecipeError(
            "data.label_field",
            f"classification needs at least 2 classes in the training set; column {label_field!r} has {shown}",
        )
    return dataset_dict, names


def make_collator(task: str, tokenizer, model: Any = None, mlm_probability: float = 0.15):
    """The stock transformers collator for each task (techniques may wrap or replace it)."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "masked_lm":
        if tokenizer.mask_token is None:
            raise RecipeError("model.tokenizer", "masked LM needs a tokenizer with a mask token")
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)
    if task == "classification":
        return DataCollatorWithPadding(tokenizer)
    # Pads input_ids/attention_mask with the pad id and labels with -100 (no loss on padding).
    return DataCollatorForSeq2Seq(tokenizer, model=model if task == "seq2seq" else None, label_pad_token_id=-100)
