"""Sequence packing without cross-contamination: several tokenized documents share one row, each attending only to
itself.

Krell et al., "Efficient Sequence Packing without Cross-contamination: Accelerating Large Language Models without
Impacting Performance", arXiv 2107.02027. Documents of lengths ``l_i <= C`` (``C``: the row length) are assigned
to rows (bins) of capacity ``C``:

- ``best_fit_decreasing`` (default): documents by decreasing length (ties: dataset order); each goes to the open
  row with the least room ``r >= l_i`` (ties: the row opened first), or opens a new row. BFD needs at most
  ``11/9 OPT + 6/9`` rows.
- ``greedy``: next fit in dataset order (one open row; a document that does not fit closes it). Keeps the data
  order, e.g. for curricula, at the cost of more padding.

A document longer than ``C`` is cut into ``C``-token pieces, each packed as its own document. Inside a row, the
document occupying positions ``[s, s + l)`` gets ``position_ids 0..l-1`` and the mask is block-diagonal causal::

    token t may attend to token u  <=>  doc(t) == doc(u)  and  u <= t

Labels: Hugging Face losses shift inside the model (logit ``t`` is scored against ``labels[t + 1]``), so the label
of each document's first token is set to -100; otherwise the previous document's last token would be trained to
predict it. Prompt labels that are already -100 (SFT) stay -100. The packed loss is therefore exactly the
token-weighted mean of the documents' own losses.

How each attention implementation gets the block mask (checked on transformers 5.24.0):

- ``sdpa``, ``eager``, ``flex_attention``: the batch carries ``position_ids`` and no ``attention_mask``.
  ``masking_utils.create_causal_mask`` then detects the packed format (``find_packed_sequence_indices``: a new
  document wherever ``position_ids[t] - position_ids[t-1] != 1``) and ANDs ``packed_sequence_mask_function`` into
  the causal mask. It runs that detection only when there is no 2D mask *and no cache*. With ``use_cache=True``,
  the default of Llama and GPT-2 configs, the model builds a ``DynamicCache`` even in training, the detection is
  skipped, and the second document attends to the first. Measured with ``DataCollatorWithFlattening`` on CPU, fp32:
  the second document's logits differ from running it alone by up to 0.47 (Llama) and 0.26 (GPT-2), for both sdpa
  and eager. With ``use_cache=False`` they differ by 2e-7. So every batch carries ``use_cache=False``.
- ``flash_attention_2/3``: ``_flash_attention_forward`` infers varlen boundaries from ``position_ids`` only for a
  batch of one row (``_is_packed_sequence`` requires ``batch_size == 1``). So the collator also sends
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` over the flattened ``rows x length`` tokens. Given these,
  ``flash_attn_varlen_func`` is used for any batch size.

Padding at the end of a short row gets ``pad_token_id``, label -100 and its own ``position_ids 0..p-1``, so it is
a separate segment that no real token attends to. GPT-2's learned absolute positions read the same
``position_ids``, so they restart per document as well.

Functional core: ``pack_dataset(ds, max_length, strategy)`` and ``PackedCollator(pad_token_id,
attn_implementation)``, usable with the stock ``Trainer`` (set ``remove_unused_columns=False`` so that
``position_ids`` reach the collator).
"""

from __future__ import annotations

import bisect
import heapq
import inspect
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainingArguments

from ..core.registry import register_technique
from ..core.technique import ORDER_DEFAULT, Env, Technique, TechniqueConfig
from ..errors import RecipeError

logger = logging.getLogger(__name__)

Strategy = Literal["best_fit_decreasing", "greedy"]
# Attention implementations whose packed path is known (see the module docstring).
MASK_FROM_POSITION_IDS = ("sdpa", "eager", "flex_attention")
FLASH = ("flash_attention_2", "flash_attention_3")
SUPPORTED_ATTENTION = MASK_FROM_POSITION_IDS + FLASH
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_CHUNK_ROWS = 4096  # rows built per Arrow chunk: bounds the Python lists held at once


# ---- bin packing ---------------------------------------------------------------------------------------------
def assign_bins(lengths: Sequence[int], capacity: int, strategy: Strategy = "best_fit_decreasing") -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows whose lengths sum to at most ``capacity``; rows in opening order,
    indices within a row in placement order."""
    if any(n < 1 or n > capacity for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    if strategy == "greedy":
        rows: list[list[int]] = []
        room = 0
        for i, n in enumerate(lengths):
            if n > room or not rows:
                rows.append([])
                room = capacity
            rows[-1].append(i)
            room -= n
        return rows
    if strategy != "best_fit_decreasing":
        raise ValueError(f"unknown strategy {strategy!r}; allowed: best_fit_decreasing, greedy")
    rows = []
    rooms: list[int] = []  # sorted distinct free room values of open rows
    by_room: dict[int, list[int]] = {}  # free room -> heap of row ids (the row opened first wins ties)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):  # the tightest row that still fits
            room = rooms[k]
            row = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room], rooms[k]
        else:
            row, room = len(rows), capacity
            rows.append([])
        rows[row].append(i)
        room -= n
        if room > 0:
            if room not in by_room:
                bisect.insort(rooms, room)
                by_room[room] = []
            heapq.heappush(by_room[room], row)
    return rows


@dataclass(frozen=True)
class PackingStats:
    """Padding before (each document alone in rows of ``length`` tokens) and after packing."""

    length: int
    strategy: str
    documents: int
    tokens: int
    rows_before: int
    rows_after: int
    padding_fraction_before: float
    padding_fraction_after: float
    split_documents: int  # documents longer than a row, cut into row-length pieces

    @classmethod
    def compute(cls, lengths: Sequence[int], rows_after: int, length: int, strategy: str) -> PackingStats:
        tokens = int(sum(lengths))
        rows_before = sum(-(-n // length) for n in lengths)  # a long document fills several rows on its own
        return cls(
            length=length,
            strategy=strategy,
            documents=len(lengths),
            tokens=tokens,
            rows_before=rows_before,
            rows_after=rows_after,
            padding_fraction_before=1 - tokens / (rows_before * length) if rows_before else 0.0,
            padding_fraction_after=1 - tokens / (rows_after * length) if rows_after else 0.0,
            split_documents=sum(n > length for n in lengths),
        )


def document_lengths(dataset: Any) -> list[int]:
    """Token count of every row (honours ``select``/``filter`` index mappings; reads Arrow, not Python lists)."""
    import pyarrow.compute as pc

    out: list[int] = []
    for table in dataset.with_format("arrow").iter(batch_size=16384):
        out.extend(pc.list_value_length(table["input_ids"]).to_pylist())
    return out


def pack_dataset(dataset: Any, max_length: int, strategy: Strategy = "best_fit_decreasing") -> Any:
    """Pack a tokenized dataset (``input_ids`` and optional ``labels``, unpadded) into rows of at most
    ``max_length`` tokens with columns ``input_ids``, ``labels`` and ``position_ids`` (see the module docstring)."""
    return pack_dataset_with_stats(dataset, max_length, strategy)[0]


def pack_dataset_with_stats(
    dataset: Any, max_length: int, strategy: Strategy = "best_fit_decreasing"
) -> tuple[Any, PackingStats]:
    import datasets

    if "input_ids" not in dataset.column_names:
        raise ValueError(f"pack_dataset needs an input_ids column (columns: {dataset.column_names})")
    lengths = document_lengths(dataset)
    pieces = [(d, s, min(s + max_length, n)) for d, n in enumerate(lengths) for s in range(0, n, max_length) if n]
    if not pieces:
        raise ValueError("pack_dataset: the dataset holds no tokens")
    rows = assign_bins([e - s for _, s, e in pieces], max_length, strategy)
    has_labels = "labels" in dataset.column_names
    chunks = []
    for c in range(0, len(rows), _CHUNK_ROWS):
        chunk_rows = rows[c : c + _CHUNK_ROWS]
        docs = sorted({pieces[p][0] for row in chunk_rows for p in row})
        source = dataset.select(docs).with_format(None)[:]
        where = {d: k for k, d in enumerate(docs)}
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in chunk_rows:
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for p in row:
                d, s, e = pieces[p]
                piece = source["input_ids"][where[d]][s:e]
                piece_labels = list(source["labels"][where[d]][s:e]) if has_labels else list(piece)
                piece_labels[0] = -100  # the previous document's last token must not predict this one
                ids += piece
                labels += piece_labels
                positions += range(e - s)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(positions)
        chunks.append(datasets.Dataset.from_dict(out))
        del source, out
    packed = datasets.concatenate_datasets(chunks) if len(chunks) > 1 else chunks[0]
    stats = PackingStats.compute(lengths, len(rows), max_length, strategy)
    logger.info(
        "packing: %d documents (%d tokens) into %d rows of %d; padding %.1f%% -> %.1f%% (%s)",
        stats.documents,
        stats.tokens,
        stats.rows_after,
        max_length,
        100 * stats.padding_fraction_before,
        100 * stats.padding_fraction_after,
        strategy,
    )
    return packed, stats


# ---- collation -----------------------------------------------------------------------------------------------
def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """``cu_seq_lens_q/k`` and ``max_length_q/k`` for ``flash_attn_varlen_func`` over the flattened rows: a segment
    starts wherever a position id is 0 and at every row start."""
    rows, length = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([flat, torch.tensor([rows * length], device=flat.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


class PackedCollator:
    """Pads packed rows (from ``pack_dataset``) to the longest row and adds what the model needs so attention stays
    inside each document: ``position_ids`` (restarting per document), ``use_cache=False``, and for flash-attention
    the varlen ``cu_seq_lens``. Rows without ``position_ids`` are treated as one document each (evaluation sets)."""

    def __init__(
        self,
        pad_token_id: int = 0,
        attn_implementation: str = "sdpa",
        pad_to_multiple_of: int | None = None,
        label_pad_token_id: int = -100,
    ):
        if attn_implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attn_implementation {attn_implementation!r}; supported: {', '.join(SUPPORTED_ATTENTION)}"
            )
        self.pad_token_id = pad_token_id
        self.attn_implementation = attn_implementation
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_token_id = label_pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = []
        for f in features:
            ids = _as_list(f["input_ids"])
            labels = _as_list(f["labels"]) if "labels" in f else list(ids)
            positions = _as_list(f["position_ids"]) if "position_ids" in f else list(range(len(ids)))
            if not (len(ids) == len(labels) == len(positions)) or not ids or positions[0] != 0:
                raise ValueError("each row needs equally long input_ids/labels/position_ids starting at position 0")
            rows.append((ids, labels, positions))
        width = max(len(r[0]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), self.label_pad_token_id, dtype=torch.long)
        position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
        for b, (ids, lab, pos) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            labels[b, :n] = torch.tensor(lab)
            position_ids[b, :n] = torch.tensor(pos)
            position_ids[b, n:] -= n  # padding: its own segment, positions 0..p-1
        labels[position_ids == 0] = self.label_pad_token_id  # idempotent with pack_dataset; guards hand-made rows
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "use_cache": False,  # a cache disables transformers' packed-sequence mask (module docstring)
        }
        if self.attn_implementation in FLASH:
            batch.update(flash_varlen_kwargs(position_ids))
        return batch


# ---- technique -------------------------------------------------------------------------------------------------
class PackingConfig(TechniqueConfig):
    name: Literal["packing"] = "packing"
    length: int | None = Field(
        None,
        ge=8,
        le=1_048_576,
        description="Row length in tokens; default data.max_length. Longer documents are cut.",
    )
    strategy: Strategy = Field(
        "best_fit_decreasing",
        description="best_fit_decreasing (fewest rows) or greedy (next fit in dataset order, keeps the data order).",
    )


@register_technique
class PackingTechnique(Technique):
    """Packs the tokenized training set in ``on_dataset`` and replaces the collator with ``PackedCollator``."""

    name = "packing"
    Config = PackingConfig
    survey_section = "Computation efficiency / Data selection (padding removal)"
    paper = (
        'Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination: Accelerating Large Language '
        'Models without Impacting Performance", arXiv 2107.02027'
    )
    # After default-band dataset transforms (e.g. pruning), so it packs the documents they keep. Its collator
    # replaces the incoming one; a technique wrapping the packed collator needs an order above this.
    order = ORDER_DEFAULT + 200

    config: PackingConfig

    def __init__(self, config: PackingConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.length: int | None = self.config.length
        self.pad_token_id = 0
        self.attn_implementation = "sdpa"
        self.stats: PackingStats | None = None

    def validate(self, recipe: Any, env: Env) -> None:
        task = recipe.model.task
        if task not in ("auto", "causal_lm", "sft"):
            raise RecipeError("", f"packing needs a decoder-only causal LM (model.task causal_lm or sft), got {task}")
        impl = recipe.model.attn_implementation
        if impl is not None and impl not in SUPPORTED_ATTENTION:
            raise RecipeError(
                "",
                f"model.attn_implementation={impl!r} has no packed path; use one of {', '.join(SUPPORTED_ATTENTION)}",
            )
        self.length = self.config.length or recipe.data.max_length

    def on_dataset(self, dataset: Any, tokenizer: Any) -> Any:
        import datasets

        columns = dataset.column_names
        if "special_tokens_mask" in columns or isinstance(dataset.features.get("labels"), datasets.Value):
            raise RecipeError("model.task", "packing applies to causal_lm and sft data (token labels), not this task")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad if pad is not None else 0
        keep = [c for c in columns if c not in ("input_ids", "labels")]
        dataset = dataset.remove_columns(keep)
        length = self.length or max(document_lengths(dataset))  # validate() sets it from data.max_length
        packed, self.stats = pack_dataset_with_stats(dataset, length, self.config.strategy)
        return packed

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            raise RecipeError("model.name_or_path", "packing needs a decoder-only causal LM, not an encoder-decoder")
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise RecipeError(
                "model.attn_implementation",
                f"{impl!r} has no packed path; use one of {', '.join(SUPPORTED_ATTENTION)}",
            )
        params = inspect.signature(model.forward).parameters
        if "position_ids" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise RecipeError("model.name_or_path", f"{type(model).__name__}.forward takes no position_ids")
        self.attn_implementation = impl
        return model

    def collator(self, collator: Any) -> Any:
        return PackedCollator(pad_token_id=self.pad_token_id, attn_implementation=self.attn_implementation)

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        args.remove_unused_columns = False  # position_ids mark the documents; the Trainer must not drop them
        return args

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attn_implementation": self.attn_implementation}
        if self.stats is not None:
            out.update(asdict(self.stats))
        return out
