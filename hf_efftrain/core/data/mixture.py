"""The training and evaluation rows of a recipe's ``data`` section, before tokenization.

``data.train`` is one source (a string: its ``train`` split, as it always was) or a list of sources. A list is
interleaved with ``datasets.interleave_datasets(probabilities=weights / sum(weights), seed=...,
stopping_strategy="all_exhausted")`` (https://huggingface.co/docs/datasets/process#interleave). The seed is the run's
``data_seed`` (else ``seed``), so a resumed run rebuilds the identical mixture before training starts.
``all_exhausted`` oversamples: each row's source is drawn by weight until every row of every source has been drawn
once, so the shares follow the weights and no row is left out; a small or heavily weighted source repeats.
(``first_exhausted`` would stop at the first source to run out and keep only the head of the others.) The mixture
has about ``max(len(source) / share)`` rows.

The evaluation rows, by the first that applies:
- ``data.eval``: that source's ``train`` split; a list is concatenated (each held-out row once, weights do not apply);
- ``data.eval_split``: that split of every train source;
- ``data.eval_fraction``: ``train_test_split(test_size=fraction, seed=...)`` of every train source before mixing, so
  that oversampling can never repeat a held-out row into the training mixture;
- else the ``validation`` split of each train source that has one.

The sources of a list keep only the task's columns, which must have the same types in all of them (string and
large_string, or integer widths, are cast to the first source's); a mismatch names the source's index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ...errors import RecipeError
from .sources import load_source, pick_split, require_columns

logger = logging.getLogger(__name__)


@dataclass
class _Source:
    field: str  # "data.train" (the simple form) or "data.train[1]"
    path: str
    split: str
    weight: float
    splits: Any  # the source's datasets.DatasetDict
    listed: bool  # given as a list entry (its errors name data.train[i]; its columns are selected)

    @property
    def label(self) -> str:  # how messages name it
        return f"{self.field} ({self.path})" if self.listed else self.path

    @property
    def rows(self):
        return self.splits[self.split]


@dataclass
class Sources:
    """Every source of ``data.train`` and ``data.eval``, loaded, with the split each one trains or evaluates on."""

    data_cfg: Any
    train: list[_Source]
    eval: list[_Source]

    @property
    def columns(self) -> list[str]:
        """The first training source's columns (what the task is inferred from)."""
        return self.train[0].rows.column_names

    def splits(self, columns: dict[str, str], seed: int):
        """(training rows, evaluation rows or None); ``columns`` maps field path -> column the task needs."""
        cfg = self.data_cfg
        train = [_columns(s, s.rows, columns) for s in self.train]
        held: list[tuple[_Source, Any]] = []
        if cfg.eval_split is not None:
            held = [(s, _eval_split(s, cfg.eval_split)) for s in self.train]
        elif cfg.eval_fraction is not None:
            for i, s in enumerate(self.train):
                parts = _holdout(s, train[i], cfg.eval_fraction, seed)
                train[i] = parts["train"]
                held.append((s, parts["test"]))
        elif self.eval:
            held = [(s, s.rows) for s in self.eval]
        else:
            held = [
                (s, s.splits["validation"]) for s in self.train if "validation" in s.splits and s.split != "validation"
            ]
        evals = [_columns(s, rows, columns) for s, rows in held]
        task = list(dict.fromkeys(columns.values()))
        train = _aligned(self.train, train, train[0], task)
        if len(train) == 1:
            mixed = train[0]
        else:
            mixed = _interleave(train, [s.weight for s in self.train], seed)
            logger.info(
                "data.train: %d rows interleaved from %s (weights %s; all_exhausted, seed %d)",
                len(mixed), ", ".join(f"{len(r)} of {s.path}" for s, r in zip(self.train, train)),
                ":".join(f"{s.weight:g}" for s in self.train), seed,
            )  # fmt: skip
        if not evals:
            return mixed, None
        import datasets

        evals = _aligned([s for s, _ in held], evals, mixed, task)
        return mixed, evals[0] if len(evals) == 1 else datasets.concatenate_datasets(evals)


def load_sources(data_cfg) -> Sources:
    """Load every source named in ``data.train`` and ``data.eval`` and pick its split (errors name the field)."""
    return Sources(
        data_cfg, _load(data_cfg.train, "data.train"), _load(data_cfg.eval, "data.eval") if data_cfg.eval else []
    )


def _load(value, field: str) -> list[_Source]:
    if isinstance(value, str):  # the simple form: the train split, errors named as before
        splits = load_source(value, field)
        pick_split(splits, "train", field, value)
        return [_Source(field, value, "train", 1.0, splits, listed=False)]
    out = []
    for i, src in enumerate(value):
        path = f"{field}[{i}]"
        splits = load_source(src.path, path, name=src.name, data_files=src.data_files, revision=src.revision)
        pick_split(splits, src.split, f"{path}.split", src.path)
        out.append(_Source(path, src.path, src.split, getattr(src, "weight", 1.0), splits, listed=True))
    return out


def _eval_split(s: _Source, split: str):
    if split == s.split:
        raise RecipeError("data.eval_split", f"{split!r} is the split {s.label} trains on; name a held-out split")
    if split not in s.splits:
        names = ",".join(repr(n) for n in s.splits)
        raise RecipeError("data.eval_split", f"{split!r} not in {{{names}}} (the splits of {s.label})")
    return s.splits[split]


def _holdout(s: _Source, rows, fraction: float, seed: int):
    try:
        return rows.train_test_split(test_size=fraction, seed=seed)
    except ValueError as e:  # too few rows: one side would be empty
        first = (str(e).strip().splitlines() or [""])[0]
        raise RecipeError("data.eval_fraction", f"{fraction} of the {len(rows)} rows of {s.label}: {first}") from None


def _columns(s: _Source, rows, columns: dict[str, str]):
    """Check the task's columns; a listed source keeps only those (the sources of a mixture must line up)."""
    if not s.listed:
        require_columns(rows, columns, s.path)
        return rows
    try:
        require_columns(rows, columns, s.path)
    except RecipeError as e:
        raise RecipeError(s.field, f"{e.message} (set by {e.path})") from None
    return rows.select_columns(list(dict.fromkeys(columns.values())))


def _aligned(sources: list[_Source], rows: list, reference, columns: list[str]) -> list:
    """Cast each listed source's ``columns`` to their features in ``reference`` when only the storage differs
    (string / large_string, integer widths); other differences are an error naming the source."""
    import datasets

    want = datasets.Features({c: reference.features[c] for c in columns})
    out = []
    for s, ds in zip(sources, rows):
        if not s.listed or ds.features == want:  # the simple form stays exactly as loaded
            out.append(ds)
            continue
        for column, feature in want.items():
            have = ds.features[column]
            if have != feature and _kind(have) != _kind(feature):
                raise RecipeError(
                    s.field,
                    f"column {column!r} of {s.path} holds {_kind(have)}, but the training data's holds "
                    f"{_kind(feature)}; the sources of a list need the same column types",
                )
        out.append(ds.cast(want))
    return out


def _kind(feature) -> str:
    """What a column holds, coarsely: types of one kind are cast to each other, others are a mismatch."""
    import datasets

    if isinstance(feature, datasets.Value):
        dtype = feature.dtype
        for kind, prefixes in (
            ("text", ("string", "large_string")),
            ("integers", ("int", "uint")),
            ("floats", ("float",)),
        ):
            if dtype.startswith(prefixes):
                return kind
        return dtype
    if isinstance(feature, datasets.ClassLabel):
        return f"class labels {feature.names}"
    return type(feature).__name__


def _interleave(rows: list, weights: list[float], seed: int):
    import datasets

    total = sum(weights)
    return datasets.interleave_datasets(
        rows, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
    )
