"""One training example as text, with the tokens that carry loss marked: what ``hf-efftrain validate`` prints.

It reads ``input_ids`` and ``labels`` only (the Trainer's convention: a label of -100 carries no loss), so it shows
the mask of any task or data format without knowing how it was made. Trained spans are wrapped in ``[[ ]]``; where
a trained input token differs from its label (a masked LM's ``<mask>``), both are shown, as ``input→label``. A long
row is cut to a window around its first trained token. Newlines and tabs are escaped, so a row stays on one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

IGNORE_INDEX = -100  # the Trainer's (and torch CrossEntropyLoss') ignore_index
WINDOW = 60  # tokens shown of a long row
BEFORE = 20  # of which before the first trained token (the end of an SFT prompt)
ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def render_example(
    tokenizer,
    input_ids: Sequence[int],
    labels: Sequence[int] | int | None,
    aligned: bool = True,
    label_names: dict[int, str] | None = None,
    window: int = WINDOW,
) -> list[str]:
    """A header line and the example. ``aligned``: ``labels[i]`` is the target at input position ``i`` (decoder-only
    and masked LMs); otherwise ``labels`` is a separate target sequence (encoder-decoder). An integer label is a
    class of the whole row (``label_names``: class id -> name)."""
    ids = [int(i) for i in input_ids]
    if labels is None or isinstance(labels, int):
        name = f" ({label_names[labels]!r})" if label_names and labels in label_names else ""
        what = "no labels: no token carries loss" if labels is None else f"class {labels}{name} for the whole row"
        return [f"{len(ids)} tokens, {what}", "  " + _clip(tokenizer, ids, window)]
    labels = [int(x) for x in labels]
    if not aligned:
        target = [x for x in labels if x != IGNORE_INDEX]
        return [
            f"{len(ids)} input tokens, {len(target)} target tokens with loss (in [[ ]])",
            "  input:  " + _clip(tokenizer, ids, window),
            "  target: [[" + _clip(tokenizer, target, window) + "]]",
        ]
    trained = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    start = max(0, min((trained[0] if trained else 0) - BEFORE, len(ids) - window))
    end = min(len(ids), start + window)
    shown = f"; tokens {start}-{end - 1} shown" if end - start < len(ids) else ""
    text = ("…" if start else "") + _marked(tokenizer, ids, labels, start, end) + ("…" if end < len(ids) else "")
    return [f"{len(ids)} tokens, {len(trained)} with loss (in [[ ]]){shown}", "  " + text]


def _marked(tokenizer, ids: list[int], labels: list[int], start: int, end: int) -> str:
    def kind(i: int) -> tuple[bool, bool]:  # (carries loss, input differs from its label)
        trained = labels[i] != IGNORE_INDEX
        return trained, trained and labels[i] != ids[i]

    out, in_span = [], False
    for (trained, differs), run in groupby(range(start, end), key=kind):
        run = list(run)
        if trained != in_span:
            out.append("[[" if trained else "]]")
            in_span = trained
        out.append(_text(tokenizer, [ids[i] for i in run]))
        if differs:
            out.append("→" + _text(tokenizer, [labels[i] for i in run]))
    return "".join(out) + ("]]" if in_span else "")


def _clip(tokenizer, ids: list[int], window: int) -> str:
    return _text(tokenizer, ids[:window]) + ("…" if len(ids) > window else "")


def _text(tokenizer, ids: list[int]) -> str:
    # Decoded per run, not per token: a byte-level BPE splits one character over several tokens.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).translate(ESCAPES)
