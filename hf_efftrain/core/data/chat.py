"""Conversations rendered with the tokenizer's own chat template, and which of their tokens carry the loss.

Rendering is transformers' ``apply_chat_template`` (https://huggingface.co/docs/transformers/chat_templating):
system prompts, every turn, the template's own control tokens, and no BOS/EOS beyond what the template writes.
Labels (``data.loss_on``; ``formats.py``):

- ``assistant_only`` / ``completion_only``: the tokens of every assistant turn, -100 elsewhere.
  - A template with ``{% generation %}`` markers: transformers' ``return_assistant_tokens_mask`` (its tokens that
    overlap the marked text).
  - A template without them: assistant turn ``i`` is the text between the rendering of turns ``< i`` with
    ``add_generation_prompt=True`` (so the role header stays unlabelled) and the rendering of turns ``<= i``; tokens
    overlapping it (the fast tokenizer's offsets) are labelled. Both renderings must be prefixes of the whole
    conversation's, and the text between them must start with the answer (after whitespace). A template that
    rewrites earlier turns (drops past reasoning, say), or writes a role header that ``add_generation_prompt`` does
    not, cannot be masked this way: a ``RecipeError`` on ``model.chat_template``, never a silent wrong loss.
- ``all``: every token.

``model.chat_template`` sets or overrides the template: a named one (``builtins.CHAT_TEMPLATES``), a Jinja file,
or inline Jinja. Conversation data on a tokenizer without a template is an error naming that field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import datasets

from ...builtins import CHAT_TEMPLATES, TEMPLATE_TOKENS
from ...errors import RecipeError
from .formats import (
    CONVERSATIONS,
    conversation_column,
    prompt_completion_columns,
    prompt_completion_messages,
    prompt_completion_turns,
    to_messages,
)

# transformers' own test for a template that can return the assistant mask (utils/chat_template_utils.py).
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
_IDS = datasets.List(datasets.Value("int64"))
# Declared, so that a map batch whose rows are all skipped (empty lists) keeps the column types of the others.
FEATURES = datasets.Features(
    {"input_ids": _IDS, "attention_mask": _IDS, "labels": _IDS, "_skip": datasets.Value("bool"),
     "_truncated": datasets.Value("bool"), "_error": datasets.Value("string")}
)  # fmt: skip


def with_chat_template(tokenizer, spec: str | None):
    """``tokenizer`` with ``model.chat_template`` applied (a copy: the built-in tokenizer is shared in-process)."""
    if spec is None:
        return tokenizer
    import jinja2

    if spec in CHAT_TEMPLATES:
        text = CHAT_TEMPLATES[spec]
        _require_tokens(tokenizer, spec)
    elif "{{" in spec or "{%" in spec:
        text = spec
    else:
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError("model.chat_template", f"could not read {spec}: {type(e).__name__}: {e}") from None
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = text
    try:
        tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except jinja2.TemplateError as e:
        raise RecipeError("model.chat_template", f"not a usable chat template: {type(e).__name__}: {e}") from None
    return tokenizer


def _require_tokens(tokenizer, name: str) -> None:
    """A named template's control tokens must be single tokens of the tokenizer (the model family's own)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in TEMPLATE_TOKENS[name] if t not in vocab]
    if missing:
        fits = [n for n, tokens in TEMPLATE_TOKENS.items() if tokens and all(t in vocab for t in tokens)]
        raise RecipeError(
            "model.chat_template",
            f"{name} writes {', '.join(missing)}, which this tokenizer does not have as a token (a template of "
            f"another model family); use {' or '.join(fits + ['chatml'])}, a Jinja file, or inline Jinja",
        )


def template_of(tokenizer) -> str | None:
    """The tokenizer's chat template text (its default one when it has several), or None."""
    try:
        return tokenizer.get_chat_template()
    except ValueError:  # transformers' words for "no chat template"
        return None


def require_template(tokenizer, fmt: str) -> None:
    """Conversations need a chat template, and masks need a fast tokenizer (token offsets)."""
    if template_of(tokenizer) is None:
        raise RecipeError(
            "model.chat_template",
            f"the tokenizer has no chat template, and {fmt} data is rendered with one: set model.chat_template to a "
            f"Jinja file, inline Jinja, or one of: {', '.join(CHAT_TEMPLATES)}",
        )
    if not tokenizer.is_fast:
        raise RecipeError("model.tokenizer", "conversation data needs a fast tokenizer (token offsets for the masks)")


def encode(
    tokenizer,
    conversations: list[list[dict[str, Any]]],
    loss_on: str,
    rows: list[int] | None = None,
    context: list[int] | None = None,
):
    """(input_ids, labels) of each conversation, untruncated; ``rows`` (1-based) name them in errors. ``context``:
    per conversation, how many leading turns are a prompt whose assistant turns carry no loss (conversational
    prompt-completion)."""
    if not conversations:
        return [], []
    rows = rows or list(range(1, len(conversations) + 1))
    ids, labels = _encode(tokenizer, conversations, loss_on, rows)
    for k, (conversation, n) in enumerate(zip(conversations, context or ())):
        if loss_on != "all" and any(t["role"] == "assistant" for t in conversation[:n]):
            cut = _prefix_tokens(tokenizer, conversation, n, ids[k], rows[k])
            labels[k] = [-100] * cut + labels[k][cut:]
    return ids, labels


def _prefix_tokens(tokenizer, conversation: list[dict[str, Any]], n: int, ids: list[int], row: int) -> int:
    """How many of ``ids`` (the whole conversation) lie within the render of its first ``n`` turns with the
    generation prompt: the tokens before the completion. A token that straddles the boundary belongs to the
    completion, as a straddling token of an assistant span is labelled (``_overlapping``)."""
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    prefix = tokenizer.apply_chat_template(conversation[:n], tokenize=False, add_generation_prompt=True)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    if not full.startswith(prefix) or list(enc["input_ids"]) != list(ids):
        raise RecipeError(
            "model.chat_template",
            f"row {row}: the template renders the prompt's turns differently before the completion, so the "
            "prompt's assistant turns cannot be told from the completion's",
        )
    return sum(end <= len(prefix) for _, end in enc["offset_mapping"])


def _encode(tokenizer, conversations: list[list[dict[str, Any]]], loss_on: str, rows: list[int]):
    import jinja2

    template = template_of(tokenizer)
    marked = bool(GENERATION_MARKER.search(template)) and loss_on != "all"
    try:
        if not marked:
            texts, spans = zip(*(_spans_by_prefix(tokenizer, c, r, loss_on) for c, r in zip(conversations, rows)))
            enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=loss_on != "all")
            if loss_on == "all":
                return enc["input_ids"], [list(i) for i in enc["input_ids"]]
            masks = [_overlapping(offsets, s) for offsets, s in zip(enc["offset_mapping"], spans)]
        else:
            enc = tokenizer.apply_chat_template(
                conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            masks = enc["assistant_masks"]
    except jinja2.TemplateError as e:
        if len(conversations) > 1:  # find the row the template refused
            for c, r in zip(conversations, rows):
                _encode(tokenizer, [c], loss_on, [r])
        raise RecipeError("model.chat_template", f"row {rows[0]}: the template refused it: {e}") from None
    ids = enc["input_ids"]
    if marked:
        for conversation, mask, row in zip(conversations, masks, rows):
            if not any(mask) and any(t["role"] == "assistant" and t["content"] for t in conversation):
                raise RecipeError(
                    "model.chat_template",
                    f"row {row}: the template's {{% generation %}} markers cover no token of its assistant turns",
                )
    return ids, [[t if m else -100 for t, m in zip(i, mask)] for i, mask in zip(ids, masks)]


def _spans_by_prefix(tokenizer, conversation, row: int, loss_on: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (see the module docstring)."""

    def render(turns, prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    full = render(conversation)
    spans: list[tuple[int, int]] = []
    for i, turn in enumerate(conversation if loss_on != "all" else ()):
        if turn["role"] != "assistant":
            continue
        if i == 0:
            raise RecipeError(
                "model.chat_template",
                f"row {row} starts with an assistant turn, which a template without {{% generation %}} markers "
                "cannot mask (nothing renders before it); add the markers or drop that turn",
            )
        before, through = render(conversation[:i], prompt=True), render(conversation[: i + 1])
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise RecipeError(
                "model.chat_template",
                f"row {row}, turn {i + 1}: the template renders the turns before it differently inside the whole "
                "conversation, so its assistant tokens cannot be found by prefix; give a template with "
                "{% generation %} markers around the assistant turns",
            )
        span, answer = full[len(before) : len(through)], turn["content"].strip()
        k = span.find(answer) if answer else 0
        if k < 0 or span[:k].strip():
            what = (
                "does not write the assistant's answer as given"
                if k < 0
                else f"writes {span[:k].strip()!r} before the assistant's answer even with add_generation_prompt=True"
            )
            raise RecipeError(
                "model.chat_template",
                f"row {row}, turn {i + 1}: the template {what}, so the answer's tokens cannot be found; give a "
                "template with {% generation %} markers around the assistant turns",
            )
        spans.append((len(before), len(through)))
    return full, spans


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a span (both in order: one pass)."""
    mask, k = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[t] = int(end > spans[k][0] and end > start)
    return mask


def tokenize_chat(batch, indices, tok, cfg, fmt: str, loss_on: str, turns: bool = False):
    """``datasets.map`` function: rows of ``fmt`` data -> input_ids / attention_mask / labels (+ the ``_skip``,
    ``_truncated`` flags of ``tokenization.tokenize``). A user error comes back in ``_error`` ("path<TAB>message"): a
    ``RecipeError`` does not survive the trip back from a ``num_proc`` worker (it does not unpickle)."""
    n = len(indices)
    try:
        conversations, context = _conversations(batch, cfg, fmt, [i + 1 for i in indices], turns)
        keep = [k for k, c in enumerate(conversations) if c]
        rows = [indices[k] + 1 for k in keep]
        ids, labels = encode(tok, [conversations[k] for k in keep], loss_on, rows, [context[k] for k in keep])
    except RecipeError as e:
        empty = [[]] * n
        error = [f"{e.path}\t{e.message}"] * n
        return {"input_ids": empty, "attention_mask": empty, "labels": empty, "_skip": [True] * n,
                "_truncated": [False] * n, "_error": error}  # fmt: skip
    out: dict[str, list] = {"input_ids": [[]] * n, "labels": [[]] * n, "_skip": [True] * n, "_truncated": [False] * n}
    for k, i, lab in zip(keep, ids, labels):
        cut, cut_labels = i[: cfg.max_length], lab[: cfg.max_length]
        out["input_ids"][k], out["labels"][k] = cut, cut_labels
        # The loss shifts: the first label never counts. No target left within max_length: nothing to learn.
        out["_skip"][k] = len(cut) < 2 or all(t == -100 for t in cut_labels[1:])
        out["_truncated"][k] = len(i) > cfg.max_length
    out["attention_mask"] = [[1] * len(r) for r in out["input_ids"]]
    out["_error"] = [""] * n
    return out


def _conversations(
    batch, cfg, fmt: str, rows: list[int], turns: bool = False
) -> tuple[list[list[dict] | None], list[int]]:
    """The rows as conversations, and per row the number of leading turns that carry no loss (a prompt's);
    ``turns``: prompt_completion columns of turns (``tokenization._turns_columns``)."""
    none = [0] * len(rows)
    if fmt in CONVERSATIONS:
        return [to_messages(t, fmt, r) for t, r in zip(batch[conversation_column(cfg, fmt)], rows)], none
    prompt, response, extra = prompt_completion_columns(cfg, list(batch))
    if turns:
        pairs = [prompt_completion_turns(p, c, r) for p, c, r in zip(batch[prompt], batch[response], rows)]
        return [c for c, _ in pairs], [k for _, k in pairs]
    extras = batch[extra] if extra else [None] * len(rows)
    return [prompt_completion_messages(p, x, r) for p, x, r in zip(batch[prompt], extras, batch[response])], none
