"""Data formats (``data.format``) and what carries the loss (``data.loss_on``).

- ``text``: one text column (``data.text_field``): causal LM, masked LM, classification.
- ``prompt_completion``: a prompt and a response column (``data.prompt_field`` / ``response_field``; with their
  defaults left alone, the alpaca ``instruction`` / ``output`` and TRL's ``completion`` names are found too). An
  ``input`` column (``data.input_field``, alpaca) joins the prompt after a blank line, so it is never dropped. Both
  columns may instead hold ``{role, content}`` turns (TRL's conversational prompt-completion): the completion's
  assistant turns carry the loss, none of the prompt's.
- ``messages``: a column (``data.messages_field``, default ``messages``) of OpenAI-style ``{role, content}`` turns;
  a content given as parts (``[{type: text, text}]``) is their text joined (other part types are refused).
- ``sharegpt``: a column (default ``conversations``) of ``{from, value}`` turns, ``from`` mapped to a role.

- ``preference``: a prompt, a preferred and a dispreferred response (``data.prompt_field``, ``chosen_field``,
  ``rejected_field``; TRL's preference format), as text or turns; the prompt may be left out, as what the two
  share (``preference.py``). Trained by a preference objective (the ``dpo`` technique).

``auto`` picks, in this order: chosen and rejected columns, a ``messages`` column, a ``conversations`` column, a
prompt and a response column, else text. Conversations are rendered by ``chat.py``.
"""

from __future__ import annotations

from typing import Any

from ...errors import RecipeError

CONVERSATIONS = ("messages", "sharegpt")
PAIR_TASKS = ("preference", "reward")  # the tasks on preference pairs: a policy (dpo) or a reward model
# Which formats each model.task trains on ("auto": the task is inferred from the format, see build.infer_task).
TASK_FORMATS = {
    "causal_lm": ("text",),
    "masked_lm": ("text",),
    "classification": ("text",),
    "seq2seq": ("prompt_completion", "text"),
    "sft": ("prompt_completion", "messages", "sharegpt"),
    "preference": ("preference",),
    "reward": ("preference",),
}
# data.loss_on each format allows; the first is its default.
LOSS_ON = {
    "text": ("all",),
    "prompt_completion": ("completion_only", "all"),
    "messages": ("assistant_only", "all"),
    "sharegpt": ("assistant_only", "all"),
}
PROMPT_NAMES = ("instruction",)  # alpaca
RESPONSE_NAMES = ("completion", "output")  # TRL's prompt-completion, alpaca
ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI chat roles
# ShareGPT / LLaMA-Factory speaker names -> roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def conversation_column(cfg, fmt: str) -> str:
    """The column holding the turns: ``data.messages_field``, else ``messages`` / ``conversations`` by format."""
    return cfg.messages_field or ("conversations" if fmt == "sharegpt" else "messages")


def prompt_completion_columns(cfg, columns) -> tuple[str, str, str | None]:
    """(prompt, response, input or None) column names. A field left at its default falls back to the alpaca /
    TRL name when only that one is present; the input column is used when present (or named explicitly)."""
    set_ = cfg.model_fields_set

    def pick(field: str, others: tuple[str, ...]) -> str:
        name = getattr(cfg, field)
        if field in set_ or name in columns:
            return name
        return next((o for o in others if o in columns), name)

    extra = cfg.input_field if cfg.input_field in columns or "input_field" in set_ else None
    return pick("prompt_field", PROMPT_NAMES), pick("response_field", RESPONSE_NAMES), extra


def data_format(cfg, columns, task: str = "auto") -> str:
    """``data.format``, or the one the columns show (``columns``: names, or a ``datasets.Features`` to tell
    messages from sharegpt turns by their keys); a format ``task`` cannot train on is a ``RecipeError``."""
    fmt = cfg.format if cfg.format != "auto" else _infer(cfg, columns, task)
    allowed = TASK_FORMATS.get(task, ())
    if allowed and fmt not in allowed:
        fix = (
            "a decoder-only model (model.task sft)"
            if fmt in CONVERSATIONS
            else "model.task preference or reward and its objective ({name: dpo} or {name: reward_model})"
            if fmt == "preference"
            else " or ".join(allowed)
        )
        raise RecipeError("data.format", f"{fmt} data does not fit model.task {task}; it needs {fix}")
    return fmt


def _infer(cfg, columns, task: str) -> str:
    if task in ("causal_lm", "masked_lm", "classification"):
        return "text"
    if task in PAIR_TASKS or cfg.chosen_field in columns and cfg.rejected_field in columns:
        return "preference"  # a missing column is named by tokenize
    if cfg.messages_field is not None:  # named explicitly: a conversation column, whatever its keys say
        keys = _turn_keys(columns.get(cfg.messages_field) if isinstance(columns, dict) else None)
        return "sharegpt" if {"from", "value"} <= keys else "messages"
    for fmt in CONVERSATIONS:
        if conversation_column(cfg, fmt) in columns:
            return fmt
    prompt, response, _ = prompt_completion_columns(cfg, columns)
    if (prompt in columns and response in columns) or task == "sft":  # sft: a missing column is named later
        return "prompt_completion"
    return "text"


def _turn_keys(feature: Any) -> set[str]:
    inner = getattr(feature, "feature", None)  # datasets.List / LargeList of a struct (a dict of features)
    return set(inner) if isinstance(inner, dict) else set()


def is_turns(feature: Any) -> bool:
    """A column of ``{role, content}`` turn lists: TRL's conversational prompt / completion columns."""
    return {"role", "content"} <= _turn_keys(feature)


def resolve_loss_on(cfg, fmt: str, task: str) -> str:
    """``data.loss_on`` checked against the format, or the format's default."""
    if task not in ("causal_lm", "sft"):
        if cfg.loss_on is not None:
            raise RecipeError("data.loss_on", f"applies to causal_lm and sft data; model.task {task} sets its own")
        return "all"
    allowed = LOSS_ON[fmt]
    if cfg.loss_on is not None and cfg.loss_on not in allowed:
        raise RecipeError("data.loss_on", f"{cfg.loss_on} does not apply to {fmt} data; allowed: {', '.join(allowed)}")
    return cfg.loss_on or allowed[0]


def check_conversation_column(dataset, cfg, fmt: str, source: str) -> str:
    """The turns column of ``dataset``: present, and a list of turns with the format's keys."""
    column, keys = conversation_column(cfg, fmt), ("role", "content") if fmt == "messages" else ("from", "value")
    if column not in dataset.column_names:
        raise RecipeError(
            "data.messages_field", f"column {column!r} not in {source} (columns: {', '.join(dataset.column_names)})"
        )
    feature = dataset.features[column]
    if not set(keys) <= _turn_keys(feature):
        kind = getattr(feature, "dtype", None) or type(feature).__name__
        raise RecipeError(
            "data.messages_field",
            f"column {column!r} in {source} must hold lists of {{{', '.join(keys)}}} turns ({fmt}), not {kind}",
        )
    return column


def to_messages(
    turns: list[dict] | None, fmt: str, row: int, field: str = "data.messages_field"
) -> list[dict[str, Any]] | None:
    """One cell of the turns column as ``{role, content, ...}`` messages (None stays None: a row to skip); a turn
    with an unknown role or non-text content is a ``RecipeError`` on ``field`` naming the row (1-based) and turn."""
    if not turns:
        return None
    out = []
    for n, turn in enumerate(turns, 1):
        where = f"row {row}, turn {n}"
        if fmt == "sharegpt":
            role, content = SHAREGPT_ROLES.get(turn.get("from")), turn.get("value")
            if role is None:
                allowed = ", ".join(SHAREGPT_ROLES)
                raise RecipeError(field, f"{where}: 'from' is {turn.get('from')!r}; allowed: {allowed}")
            message = {"role": role, "content": content}
        else:
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise RecipeError(field, f"{where}: role {role!r}; allowed: {', '.join(ROLES)}")
            message = {k: v for k, v in turn.items() if v is not None}  # tool_calls, name, ... for the template
        if isinstance(content, list):  # OpenAI content parts: [{type: text, text: ...}, ...]
            content = message["content"] = _text_parts(content, where, field)
        if not isinstance(content, str):
            raise RecipeError(field, f"{where}: content must be text, not {type(content).__name__}")
        out.append(message)
    return out


def _text_parts(parts: list, where: str, field: str) -> str:
    """The text of OpenAI-style content parts, joined; a part of another kind (image, audio) is refused: training
    here is text only. (Arrow gives every part every key of the column's struct: the others are None.)"""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RecipeError(field, f"{where}: a content part of type {kind!r}; only text parts can be trained")
        texts.append(part["text"])
    return "".join(texts)


def prompt_completion_turns(
    prompt: list[dict] | None, completion: list[dict] | None, row: int
) -> tuple[list[dict[str, Any]] | None, int]:
    """TRL's conversational prompt-completion row as one conversation, and how many of its turns are the prompt
    (whose assistant turns, a few-shot history, carry no loss); (None, 0) when either side is empty."""
    turns = to_messages(prompt, "messages", row, "data.prompt_field")
    answer = to_messages(completion, "messages", row, "data.response_field")
    if not turns or not answer:
        return None, 0
    if not any(t["role"] == "assistant" for t in answer):
        raise RecipeError("data.response_field", f"row {row}: the completion has no assistant turn to learn")
    return turns + answer, len(turns)


def prompt_completion_messages(prompt: str | None, extra: str | None, response: str | None) -> list[dict] | None:
    """A prompt (+ alpaca input) and a response as one user and one assistant turn; None when either is empty."""
    if not prompt or prompt.isspace() or not response or response.isspace():
        return None
    return [{"role": "user", "content": join_prompt(prompt, extra)}, {"role": "assistant", "content": response}]


def join_prompt(prompt: str, extra: str | None) -> str:
    """The alpaca instruction and its input, separated by a blank line (as in the Alpaca prompt)."""
    return prompt if not extra or extra.isspace() else f"{prompt}\n\n{extra}"
