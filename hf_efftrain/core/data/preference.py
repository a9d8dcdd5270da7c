"""Preference pairs (``data.format: preference``): a prompt with a chosen and a rejected response, tokenized as two
SFT rows that share the prompt, and collated into one batch of 2B rows (the B chosen, then the B rejected) so a
preference objective (the ``dpo`` technique) scores both sides in one forward pass.

The columns are TRL's (https://huggingface.co/docs/trl/dataset_formats#preference): ``prompt`` / ``chosen`` /
``rejected`` (``data.prompt_field``, ``chosen_field``, ``rejected_field``), text or ``{role, content}`` turns. The
prompt may be left out (TRL's implicit prompt): it is then the turns the two responses share, or for text their
shared beginning up to its last whitespace (Anthropic HH-RLHF's layout). A text prompt beside turns is the user's
turn, unless the turns repeat it (HuggingFaceH4/ultrafeedback_binarized's layout: their shared turns win). Each side is
tokenized exactly as ``sft`` tokenizes a prompt-completion row (``tokenization._sft`` without a chat template,
``chat.tokenize_chat`` with one), so its labels cover the response only; a pair is dropped when either side has
nothing left to learn within ``data.max_length``.
"""

from __future__ import annotations

from typing import Any

import datasets

from ...errors import RecipeError
from .chat import FEATURES as CHAT_FEATURES
from .formats import is_turns

REJECTED = "rejected_"  # prefix of the rejected side's columns: rejected_input_ids, rejected_labels, ...
SIDES = ("input_ids", "attention_mask", "labels")
FEATURES = datasets.Features({**CHAT_FEATURES, **{REJECTED + k: CHAT_FEATURES[k] for k in SIDES}})
MARGIN = "margin"  # the tokenized column of each pair's margin (model.task reward; data.margin_field)


def pair_features(margin: bool) -> datasets.Features:
    """The features of tokenized pairs (and of their margins)."""
    return datasets.Features({**FEATURES, MARGIN: datasets.Value("float32")}) if margin else FEATURES


def margin_column(cfg, columns, task: str) -> str | None:
    """The margin column a reward model trains with: ``data.margin_field`` when the data has it (or the recipe set
    it, so that a missing column is named), for ``model.task: reward`` only."""
    if task != "reward":
        if "margin_field" in cfg.model_fields_set:
            raise RecipeError("data.margin_field", f"applies to model.task reward (reward_model), not {task}")
        return None
    return cfg.margin_field if cfg.margin_field in columns or "margin_field" in cfg.model_fields_set else None


def preference_columns(dataset, cfg, source: str) -> tuple[str | None, bool]:
    """(the prompt column, or None for an implicit prompt; whether the responses are turns), checked."""
    columns = dataset.column_names
    for field in ("chosen_field", "rejected_field"):
        if getattr(cfg, field) not in columns:
            raise RecipeError(
                f"data.{field}", f"column {getattr(cfg, field)!r} not in {source} (columns: {', '.join(columns)})"
            )
    if "input_field" in cfg.model_fields_set:
        raise RecipeError("data.input_field", "preference data has no input column; put it into the prompt")
    turns = [is_turns(dataset.features[getattr(cfg, f)]) for f in ("chosen_field", "rejected_field")]
    prompt = cfg.prompt_field if cfg.prompt_field in columns else None
    if turns[0] != turns[1] or prompt and is_turns(dataset.features[prompt]) and not turns[0]:
        raise RecipeError(
            "data.chosen_field",
            "chosen and rejected must both be text or both be turns (and a prompt of turns needs turns)",
        )
    return prompt, turns[0]


def split_shared_turns(chosen: list | str | None, rejected: list | str | None) -> tuple:
    """TRL's implicit prompt: (the turns both conversations start with, the rest of each). For text: the shared
    beginning up to its last whitespace (TRL's ``extract_prompt`` cuts at the first differing character, which can
    split a word: "... is 1" + "2" / "5"), the whitespace between dropped."""
    if isinstance(chosen, str) or isinstance(rejected, str):
        chosen, rejected = chosen or "", rejected or ""
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n and not chosen[n - 1].isspace() and n < max(len(chosen), len(rejected)):
            n -= 1
        n = len(chosen[:n].rstrip())
        return chosen[:n], chosen[n:].lstrip(), rejected[n:].lstrip()  # each side is its own template's response
    chosen, rejected = chosen or [], rejected or []
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def tokenize_pairs(
    batch, indices, tok, cfg, side, side_kwargs: dict[str, Any], prompt: str | None, margin: str | None = None
):
    """``datasets.map`` function: each pair -> the chosen side's input_ids / attention_mask / labels and the
    rejected side's (``rejected_*``), with the flags of ``tokenization.tokenize``. ``side(rows, indices, tok, cfg,
    **side_kwargs)`` tokenizes prompt-completion rows (``_sft_rows`` or ``chat.tokenize_chat``); ``prompt``: the
    prompt column (None: the turns the two responses share); ``margin``: the margin column, copied as ``MARGIN``."""
    chosen, rejected = batch[cfg.chosen_field], batch[cfg.rejected_field]
    if prompt is None:
        chosen, rejected, prompts = _implicit(chosen, rejected)
    else:
        prompts = batch[prompt]
        if any(isinstance(p, str) for p in prompts) and any(isinstance(c, list) for c in chosen):
            # a text prompt beside turns: the user's turn, unless the turns repeat it (their shared turns)
            chosen, rejected, shared = _implicit(chosen, rejected)
            prompts = [s or ([{"role": "user", "content": p}] if p else None) for s, p in zip(shared, prompts)]
    halves = []
    for responses in (chosen, rejected):
        rows = {cfg.prompt_field: prompts, cfg.response_field: responses}
        halves.append(side(rows, indices, tok, cfg, **side_kwargs))
    good, bad = halves
    out = {k: good[k] for k in SIDES}
    out.update({REJECTED + k: bad[k] for k in SIDES})
    out["_skip"] = [a or b for a, b in zip(good["_skip"], bad["_skip"])]
    out["_truncated"] = [a or b for a, b in zip(good["_truncated"], bad["_truncated"])]
    none = [""] * len(indices)
    out["_error"] = [a or b for a, b in zip(good.get("_error", none), bad.get("_error", none))]
    if margin is not None:
        out[MARGIN] = [_margin(m) for m in batch[margin]]
        k = next((i for i, m in enumerate(out[MARGIN]) if m is None), None)
        if k is not None:  # tokenize raises it, naming the field
            out["_error"][0] = f"data.margin_field\trow {indices[k]}: {margin} is {batch[margin][k]!r}, not a number"
    return out


def _margin(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return None
    return float(value)


def _implicit(chosen: list, rejected: list) -> tuple[list, list, list]:
    split = [split_shared_turns(c, r) for c, r in zip(chosen, rejected)]
    return [c for _, c, _ in split], [r for _, _, r in split], [p or None for p, _, _ in split]


class PreferenceCollator:
    """Pads the chosen and the rejected rows of a batch together (with ``pad``, the task's SFT collator) into one
    batch of 2B rows: the B chosen first. Any other column, one a preference objective adds per pair (dpo's
    reference log-probabilities), comes along as a tensor of B rows."""

    def __init__(self, pad):
        self.pad = pad

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [{k: f[k] for k in SIDES} for f in features]
        rows += [{k: f[REJECTED + k] for k in SIDES} for f in features]
        batch = self.pad(rows)
        for k in set(features[0]) - set(SIDES) - {REJECTED + s for s in SIDES} if features else ():
            batch[k] = torch.tensor([f[k] for f in features], dtype=torch.float32)
        return batch
