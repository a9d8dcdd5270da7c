"""Data for a recipe: load a source (builtin, local file or folder, hub id), tokenize it for the task, collate.

Tasks: ``causal_lm`` (labels = inputs), ``sft`` (loss on the response only: prompt labels are -100),
``masked_lm`` (BERT-style masking in the collator), ``seq2seq`` (prompt -> response) and ``classification``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .builtins import is_builtin, load_builtin_dataset, strip_builtin
from .errors import RecipeError

logger = logging.getLogger(__name__)

# Local file suffix -> `datasets` builder name.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Template for SFT prompts: the loss only covers what follows it.
SFT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"


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


def _load_local(p: Path, path: str):
    import datasets

    try:
        if p.is_dir():
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                return datasets.load_from_disk(str(p))
            return datasets.load_dataset(str(p))
        if p.stat().st_size == 0:
            raise RecipeError(path, f"dataset {str(p)!r} is empty")
        builder = FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise RecipeError(path, f"unsupported file type {p.suffix!r}; allowed: {', '.join(FILE_BUILDERS)}")
        return datasets.load_dataset(builder, data_files={"train": str(p)})
    except RecipeError:
        raise
    except Exception as e:  # malformed file: one line, not a traceback
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise RecipeError(path, f"could not read {p}: {type(e).__name__} {detail}".rstrip()) from None


def require_columns(dataset, columns: dict[str, str], source: str) -> None:
    """``columns`` maps recipe field path -> column name; raise naming the field and the columns present."""
    for field, column in columns.items():
        if column not in dataset.column_names:
            raise RecipeError(field, f"column {column!r} not in {source} (columns: {', '.join(dataset.column_names)})")


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


def tokenize(dataset, task: str, tokenizer, data_cfg):
    """Tokenize one split for ``task``; keeps only model inputs (input_ids, attention_mask, labels)."""
    fn = {
        "causal_lm": _causal_lm,
        "sft": _sft,
        "seq2seq": _seq2seq,
        "masked_lm": _masked_lm,
        "classification": _classification,
    }[task]
    out = dataset.map(
        fn,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"tok": tokenizer, "cfg": data_cfg},
        desc=f"tokenize ({task})",
    )
    out = out.filter(lambda ex: len(ex["input_ids"]) > 1, desc="drop empty rows")
    if len(out) == 0:
        raise RecipeError("data.train", "no example has any tokens after tokenization")
    return out


def _ids(tok, texts: list[str], max_length: int) -> list[list[int]]:
    # Truncating here (not only after) keeps long documents cheap and the tokenizer's length warning quiet.
    return tok(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


def _wrap(ids: list[int], first: int | None, last: int | None, max_length: int) -> list[int]:
    head = [first] if first is not None else []
    tail = [last] if last is not None else []
    return head + ids[: max_length - len(head) - len(tail)] + tail


def _causal_lm(batch, tok, cfg):
    rows = [
        _wrap(ids, tok.bos_token_id, tok.eos_token_id, cfg.max_length)
        for ids in _ids(tok, batch[cfg.text_field], cfg.max_length)
    ]
    return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": [list(r) for r in rows]}


def _sft(batch, tok, cfg):
    prompts = _ids(tok, [SFT_TEMPLATE.format(prompt=p) for p in batch[cfg.prompt_field]], cfg.max_length)
    responses = _ids(tok, batch[cfg.response_field], cfg.max_length)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for p, r in zip(prompts, responses):
        prompt, response = bos + p, r + eos
        ids = (prompt + response)[: cfg.max_length]
        labels = ([-100] * len(prompt) + response)[: cfg.max_length]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def _seq2seq(batch, tok, cfg):
    source, target = (cfg.prompt_field, cfg.response_field) if cfg.prompt_field in batch else (cfg.text_field,) * 2
    inputs = [_wrap(i, None, tok.eos_token_id, cfg.max_length) for i in _ids(tok, batch[source], cfg.max_length)]
    labels = [_wrap(i, None, tok.eos_token_id, cfg.max_length) for i in _ids(tok, batch[target], cfg.max_length)]
    return {"input_ids": inputs, "attention_mask": [[1] * len(r) for r in inputs], "labels": labels}


def _encoder_ids(tok, texts, max_length):
    first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    last = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    return [_wrap(ids, first, last, max_length) for ids in _ids(tok, texts, max_length)]


def _masked_lm(batch, tok, cfg):
    rows = _encoder_ids(tok, batch[cfg.text_field], cfg.max_length)
    specials = set(tok.all_special_ids)
    return {
        "input_ids": rows,
        "attention_mask": [[1] * len(r) for r in rows],
        "special_tokens_mask": [[int(i in specials) for i in r] for r in rows],
    }


def _classification(batch, tok, cfg):
    rows = _encoder_ids(tok, batch[cfg.text_field], cfg.max_length)
    return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": batch[cfg.label_field]}


def encode_labels(dataset_dict, label_field: str):
    """Make the label column integer class ids; return (dataset_dict, class names)."""
    import datasets

    train = dataset_dict["train"]
    feature = train.features[label_field]
    if not isinstance(feature, datasets.ClassLabel):
        if feature.dtype == "string":
            names = sorted({str(v) for split in dataset_dict.values() for v in split[label_field]})
            new = datasets.ClassLabel(names=names)
            dataset_dict = dataset_dict.cast_column(label_field, new)
            return dataset_dict, names
        values = sorted({int(v) for v in train[label_field]})
        if values and (values[0] < 0):
            raise RecipeError("data.label_field", f"labels must be >= 0 class ids or strings (got {values[0]})")
        return dataset_dict, [str(i) for i in range((values[-1] + 1) if values else 0)]
    return dataset_dict, list(feature.names)


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
