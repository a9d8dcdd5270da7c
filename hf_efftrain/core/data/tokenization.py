"""Tokenize one split for its task: ``causal_lm`` (labels = inputs), ``sft`` (loss on the response only: prompt
labels are -100), ``masked_lm`` (masking happens in the collator), ``seq2seq`` (prompt -> response) and
``classification``.

SFT data is ``prompt_completion``, ``messages`` or ``sharegpt`` (``formats.py``). Conversations, and
prompt_completion rows on a tokenizer with a chat template (as one user and one assistant turn), are rendered with
that template (``chat.py``). ``SFT_TEMPLATE`` (``### Instruction``) renders prompt_completion rows only for a
tokenizer without a chat template.

Rows whose text is null or empty (no tokens to learn from) are skipped, and rows longer than ``data.max_length`` are
truncated; both are counted, logged, and returned in ``stats`` (the run report's ``data`` entry). A text column that
is not text, or a label column with fewer than two classes, is a ``RecipeError`` naming the field. datasets caches
the result; its key includes the source of this code (``_fingerprint``), so a changed hf_efftrain re-tokenizes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

from ...errors import RecipeError
from .chat import FEATURES as CHAT_FEATURES
from .chat import require_template, template_of, tokenize_chat
from .formats import (
    CONVERSATIONS,
    PAIR_TASKS,
    check_conversation_column,
    conversation_column,
    data_format,
    is_turns,
    join_prompt,
    prompt_completion_columns,
    resolve_loss_on,
)
from .preference import margin_column, pair_features, preference_columns, tokenize_pairs
from .sources import _first_bad_line, describe

logger = logging.getLogger(__name__)

# Template for SFT prompts on a tokenizer without a chat template: the loss only covers what follows it.
SFT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"


def task_columns(task: str, data_cfg, columns: list[str] | None = None) -> dict[str, str]:
    """Recipe field path -> text column that ``task`` needs, by data format (``formats.py``; a conversation's turns
    column is checked by ``tokenize``). A seq2seq source with only a text column is plain text (input = target), for
    denoising objectives that build their own targets (token_masking's span mode)."""
    fmt = data_format(data_cfg, columns or (), task)
    if fmt == "preference":  # the prompt column is optional for turns (tokenize: preference.preference_columns)
        found = {f"data.{f}": getattr(data_cfg, f) for f in ("prompt_field", "chosen_field", "rejected_field")}
        found = {k: c for k, c in found.items() if k != "data.prompt_field" or c in (columns or ())}
        margin = margin_column(data_cfg, columns or (), task)
        return {**found, "data.margin_field": margin} if margin else found
    if fmt in CONVERSATIONS:  # a turns column: only its presence is checked here, its turns by tokenize
        return {"data.messages_field": conversation_column(data_cfg, fmt)}
    if fmt == "prompt_completion":
        prompt, response, extra = prompt_completion_columns(data_cfg, columns or ())
        found = {"data.prompt_field": prompt, "data.response_field": response}
        return {**found, "data.input_field": extra} if extra else found
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
        "preference": tokenize_pairs,
        "reward": tokenize_pairs,
    }[task]
    source = describe(getattr(data_cfg, split.split(".", 1)[-1], None) or data_cfg.train)  # a str or a list of sources
    fmt = data_format(data_cfg, dataset.features, task)
    kwargs, features = {"tok": tokenizer, "cfg": data_cfg}, None
    turns = fmt == "prompt_completion" and _turns_columns(dataset, data_cfg, task)
    if task == "sft" and (fmt in CONVERSATIONS or turns or template_of(tokenizer) is not None):
        if fmt in CONVERSATIONS:
            check_conversation_column(dataset, data_cfg, fmt, source)
        require_template(tokenizer, "conversational prompt_completion" if turns else fmt)
        fn, features = tokenize_chat, CHAT_FEATURES
        kwargs.update(fmt=fmt, loss_on=resolve_loss_on(data_cfg, fmt, task), turns=turns)
    elif task == "sft":
        kwargs["loss_on"] = resolve_loss_on(data_cfg, fmt, task)
    elif task in PAIR_TASKS:  # each side tokenized as an sft prompt-completion row, the loss on the response
        resolve_loss_on(data_cfg, fmt, task)
        prompt, turns = preference_columns(dataset, data_cfg, source)
        chat = turns or template_of(tokenizer) is not None
        if chat:
            require_template(tokenizer, "conversational preference" if turns else "preference")
        side = {"fmt": "prompt_completion", "loss_on": "completion_only", "turns": turns} if chat else {}
        margin = margin_column(data_cfg, dataset.column_names, task)
        kwargs.update(side=tokenize_chat if chat else _sft_rows, side_kwargs=side, prompt=prompt, margin=margin)
        features = pair_features(margin is not None)
    else:
        resolve_loss_on(data_cfg, fmt, task)  # checks the field: text data has a loss on every token
    try:
        out = dataset.map(
            fn,
            batched=True,
            with_indices=fn in (tokenize_chat, tokenize_pairs),  # row numbers for error messages
            remove_columns=dataset.column_names,
            fn_kwargs=kwargs,
            features=features,
            num_proc=data_cfg.num_proc,
            new_fingerprint=_fingerprint(dataset, fn, kwargs),
            desc=f"tokenize ({task}, {fmt})",
        )
    except UnicodeDecodeError as e:  # JSON/CSV readers keep invalid bytes; they surface when the text is read
        where = _first_bad_line(Path(source)) if Path(source).is_file() else None
        raise RecipeError(split, f"{source}: {where or f'text is not UTF-8 ({e.reason} at byte {e.start})'}") from None
    if "_error" in out.column_names:  # a user error found inside the map (chat.tokenize_chat)
        error = next((e for e in out["_error"] if e), None)
        if error:
            raise RecipeError(*error.split("\t", 1))
        out = out.remove_columns("_error")
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
            split,
            f"no example left in {source}: all {counts['rows']} rows are null or empty after tokenization"
            + (" (or have no assistant turn within data.max_length)" if fmt in CONVERSATIONS else ""),
        )
    return out


def _fingerprint(dataset, fn, kwargs: dict) -> str:
    """The cache key of a tokenization: datasets' own (input, function, arguments) plus the source of this package's
    data code. datasets hashes ``fn`` by reference, not by the code it calls, so after an upgrade (or an edit) of
    hf_efftrain the same data would otherwise come back from the cache as the old code tokenized it."""
    from datasets.fingerprint import Hasher

    return Hasher.hash([dataset._fingerprint, fn.__module__, fn.__name__, kwargs, _code_digest()])


@functools.cache
def _code_digest() -> str:
    """SHA-256 of the data pipeline's source files (this folder, and builtins/ for the chat templates)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for f in [*sorted(here.glob("*.py")), *sorted((here.parents[1] / "builtins").glob("*.py"))]:
        h.update(f.read_bytes())
    return h.hexdigest()


def _turns_columns(dataset, data_cfg, task: str) -> bool:
    """Whether the prompt and response columns hold ``{role, content}`` turns (TRL's conversational prompt-completion);
    both or neither, and only for sft (a chat template renders them)."""
    prompt, response, extra = prompt_completion_columns(data_cfg, dataset.column_names)
    kinds = {f: is_turns(dataset.features[c]) for f, c in (("prompt_field", prompt), ("response_field", response))}
    if not any(kinds.values()):
        return False
    if task != "sft":
        raise RecipeError("data.prompt_field", f"turns (role, content) train a chat model: model.task sft, not {task}")
    if not all(kinds.values()):
        text = next(f for f, k in kinds.items() if not k)
        raise RecipeError(f"data.{text}", "holds text while the other column holds turns: give both as turns")
    if extra:
        raise RecipeError("data.input_field", f"column {extra!r} is for text prompts; put it into the prompt's turns")
    return True


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


def _sft(batch, tok, cfg, loss_on: str = "completion_only"):
    prompt_col, response_col, extra_col = prompt_completion_columns(cfg, list(batch))
    extras = batch[extra_col] if extra_col else [None] * len(batch[prompt_col])
    texts = [
        None if p is None else SFT_TEMPLATE.format(prompt=join_prompt(p, x)) for p, x in zip(batch[prompt_col], extras)
    ]
    prompts = _ids(tok, texts, cfg.max_length)
    responses = _ids(tok, batch[response_col], cfg.max_length)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "_skip": [], "_truncated": []}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for p, r in zip(prompts, responses):
        prompt, response = bos + p, r + eos
        ids = (prompt + response)[: cfg.max_length]
        labels = ((list(prompt) if loss_on == "all" else [-100] * len(prompt)) + response)[: cfg.max_length]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        # No prompt or no response, or a masked prompt that fills max_length: no token carries a loss.
        out["_skip"].append(not p or not r or (loss_on != "all" and len(prompt) >= cfg.max_length))
        out["_truncated"].append(len(prompt) + len(response) > cfg.max_length)
    return out


def _sft_rows(batch, indices, tok, cfg):
    """``_sft`` as one side of a preference pair (``preference.tokenize_pairs``)."""
    return _sft(batch, tok, cfg)


def _seq2seq(batch, tok, cfg):
    if data_format(cfg, list(batch), "seq2seq") == "prompt_completion":
        source, target, extra = prompt_completion_columns(cfg, list(batch))
        extras = batch[extra] if extra else [None] * len(batch[source])
        prompts = [None if p is None else join_prompt(p, x) for p, x in zip(batch[source], extras)]
    else:  # plain text: input = target (denoising objectives build their own targets)
        target = cfg.text_field
        prompts = batch[target]
    src, tgt = _ids(tok, prompts, cfg.max_length), _ids(tok, batch[target], cfg.max_length)
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
