"""Classification labels: the label column as class ids, agreed with the checkpoint's classifier head.

A checkpoint fine-tuned for classification names its classes (``config.id2label``). When every class of the data is
one of them (case-insensitively, as ``datasets.Dataset.align_labels_with_mapping`` matches), the data is encoded with
the checkpoint's ids, so its head keeps its meaning (as HF's ``run_classification.py`` does); integer labels are
taken as those ids. Otherwise the classes are the data's own (sorted names), and a head of another size is
re-initialized (``from_pretrained(ignore_mismatched_sizes=True)``), said in a warning and in the run report.
"""

from __future__ import annotations

import logging
from typing import Any

from ...errors import RecipeError

logger = logging.getLogger(__name__)

# Class ids name the rows of the classifier head: an id of 10**9 would allocate a billion-row head.
MAX_CLASSES = 100_000


def checkpoint_head(config) -> list[str] | None:
    """The class names (in id order) of the sequence-classification head the checkpoint holds, or None (no head).
    HF's default names (``LABEL_0``, ...) are returned too: they say the head's size, not what its rows mean."""
    if not any(str(a).endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return None
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]


def _named(head: list[str] | None) -> list[str] | None:
    if head is None or all(n == f"LABEL_{i}" for i, n in enumerate(head)):
        return None
    lower = [n.lower() for n in head]
    return head if len(set(lower)) == len(lower) else None  # ambiguous case-insensitively: not matched by name


def _align(dataset_dict, label_field: str, names: list[str], integer: bool, head: list[str] | None):
    """(dataset_dict, names) with the checkpoint's ids where every data class is one of the head's classes."""
    known = _named(head)
    if known is None:
        return dataset_dict, names
    if integer:  # ids already: they index the head's rows, whose names the checkpoint gives
        return dataset_dict, (list(known) if len(names) <= len(known) else names)
    if not {n.lower() for n in names} <= {n.lower() for n in known} or names == known:
        return dataset_dict, names
    mapping = {n: i for i, n in enumerate(known)}
    for split in list(dataset_dict):
        dataset_dict[split] = dataset_dict[split].align_labels_with_mapping(mapping, label_field)
    return dataset_dict, list(known)


def encode_labels(dataset_dict, label_field: str, head: list[str] | None = None):
    """Make the label column integer class ids; return (dataset_dict, class names). ``head``: ``checkpoint_head``."""
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
    dataset_dict, names = _align(dataset_dict, label_field, names, integer, head)
    train = dataset_dict["train"]
    present = sorted(set(train[label_field]))
    if len(present) < 2:
        shown = ", ".join(names[int(i)] for i in present) or "none"
        raise RecipeError(
            "data.label_field",
            f"classification needs at least 2 classes in the training set; column {label_field!r} has {shown}",
        )
    return dataset_dict, names


def set_label_config(config, names: list[str], num_labels: int | None, head: list[str] | None) -> dict[str, Any]:
    """Size the config's head for ``names`` (``model.num_labels`` may ask for more rows); returns what the run report
    records of the checkpoint's head: ``{}`` without one, else whether it is kept or re-initialized."""
    if num_labels is not None and num_labels < len(names):
        raise RecipeError("model.num_labels", f"{num_labels} but the data has {len(names)} classes")
    config.num_labels = num_labels or len(names)
    config.id2label = dict(enumerate(names + [f"LABEL_{i}" for i in range(len(names), config.num_labels)]))
    config.label2id = {n: i for i, n in config.id2label.items()}
    if head is None:
        return {}
    shown = ", ".join(head[:8]) + (", ..." if len(head) > 8 else "")
    if len(head) == config.num_labels:
        if _named(head) is not None and head != names[: len(head)]:
            logger.warning("the checkpoint's classifier rows were trained for (%s); they now stand for (%s)", shown,
                           ", ".join(names[:8]))  # fmt: skip
        return {"classifier_head": "kept", "checkpoint_labels": head}
    logger.warning("the checkpoint's classifier head has %d classes (%s); the data needs %d: it is re-initialized",
                   len(head), shown, config.num_labels)  # fmt: skip
    return {"classifier_head": "re-initialized", "checkpoint_labels": head}
