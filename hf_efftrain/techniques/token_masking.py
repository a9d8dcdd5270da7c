"""Token masking: BERT-style masked-LM corruption and T5-style span corruption, per batch, seeded.

``mode: mlm`` -- Devlin et al. 2019 (arXiv 1810.04805), the survey's "token masking" (arXiv 2302.01107, Sec.
"Data efficiency"). Every non-special, non-padding token is selected independently with probability
``mask_rate``; a selected token becomes [MASK] with probability ``mask_ratio``, a random non-special vocabulary
token with probability ``random_ratio`` and stays unchanged with probability ``keep_ratio`` (80/10/10 by default).
labels = the original id at selected positions, -100 elsewhere.

``mode: span`` -- Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", arXiv 1910.10683 (the ``random_spans_noise_mask`` objective). For a row of L tokens (its trailing EOS
set aside)::

    n_noise = clamp(round(L * mask_rate), 1, L - 1)
    n_spans = clamp(round(n_noise / mean_span_length), 1, min(n_noise, L - n_noise, #sentinels))

the noise tokens are cut into n_spans random non-empty spans, the others into n_spans random non-empty runs, and
they alternate starting with a non-noise run. inputs = the runs with the i-th noise span replaced by sentinel
``<extra_id_i>``; targets = ``<extra_id_i>`` + span i for every i (then EOS on both). Capping n_spans at the
tokenizer's sentinel count (32 for the builtin tokenizer, ids 7..38) makes spans longer on long rows.

Seeding (resume reproduces the masks): ``TokenMasker`` seeds one generator per batch from (seed, batch counter);
the counter is its ``state_dict``. In EffTrainer the technique's collator masks every batch (evaluation batches
with a seed taken from their content, so each evaluation sees the same masks) and ``on_batch`` re-masks each
training batch from its recovered original with the counter-seeded generator, so a resumed run draws exactly the
masks the uninterrupted run would have, whatever the dataloader prefetched.

Span mode on a text-only dataset: a seq2seq model on data with only ``data.text_field`` gets rows whose input and
target are both the text (``data.task_columns``); the targets are rebuilt here.
Functional core: ``mlm_mask``, ``span_corrupt``, ``span_reconstruct``, ``TokenMasker``,
``MaskingCollator`` (the latter two work with the stock Trainer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

from ..core.registry import register_technique
from ..core.technique import Technique, TechniqueConfig
from ..errors import RecipeError

logger = logging.getLogger(__name__)
_DROP_KEYS = ("decoder_input_ids", "decoder_attention_mask", "special_tokens_mask")


def sentinel_ids(tokenizer: Any) -> list[int]:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... as long as the tokenizer knows them."""
    out: list[int] = []
    vocab = tokenizer.get_vocab()
    while (tid := vocab.get(f"<extra_id_{len(out)}>")) is not None:
        out.append(tid)
    return out


def _generator(seed: int, key: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 6364136223846793005 + key * 1442695040888963407 + 1) % 2**63)


def mlm_mask(
    input_ids: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_token_id: int,
    special_ids: list[int],
    vocab_size: int,
    mask_rate: float = 0.15,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input_ids, labels); specials and padding are never selected."""
    ids = input_ids.cpu()
    specials = torch.tensor(sorted(set(special_ids)), dtype=ids.dtype)
    eligible = ~torch.isin(ids, specials)
    if attention_mask is not None:
        eligible &= attention_mask.cpu().bool()
    selected = (torch.rand(ids.shape, generator=generator) < mask_rate) & eligible
    u = torch.rand(ids.shape, generator=generator)
    to_mask = selected & (u < mask_ratio)
    to_random = selected & (u >= mask_ratio) & (u < mask_ratio + random_ratio)
    vocab = torch.arange(vocab_size, dtype=ids.dtype)
    candidates = vocab[~torch.isin(vocab, specials)]
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]
    out = torch.where(to_mask, torch.full_like(ids, mask_token_id), torch.where(to_random, random_ids, ids))
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return out.to(input_ids.device), labels.to(input_ids.device)


def _segments(n: int, k: int, generator: torch.Generator) -> list[int]:
    """n items cut into k random non-empty runs (uniform over the C(n-1, k-1) cuttings)."""
    cuts = (torch.randperm(n - 1, generator=generator)[: k - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def random_spans_noise_mask(
    length: int, density: float, mean_span: float, max_spans: int, generator: torch.Generator
) -> list[bool]:
    """T5's noise mask: alternating non-noise/noise runs, starting with non-noise (see the module docstring)."""
    if length < 2:
        return [False] * length
    n_noise = min(max(round(length * density), 1), length - 1)
    n_spans = min(max(round(n_noise / mean_span), 1), n_noise, length - n_noise, max_spans)
    mask: list[bool] = []
    for keep, noise in zip(_segments(length - n_noise, n_spans, generator), _segments(n_noise, n_spans, generator)):
        mask += [False] * keep + [True] * noise
    return mask


def span_corrupt(
    ids: list[int], generator: torch.Generator, sentinels: list[int], density: float = 0.15, mean_span: float = 3.0
) -> tuple[list[int], list[int]]:
    """(inputs, targets) for one row without EOS: noise spans -> sentinels in inputs, sentinel + span in targets."""
    mask = random_spans_noise_mask(len(ids), density, mean_span, len(sentinels), generator)
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, (tok, noise) in enumerate(zip(ids, mask)):
        if noise and (i == 0 or not mask[i - 1]):
            span += 1
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
        (targets if noise else inputs).append(tok)
    return inputs, targets


def span_reconstruct(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """The original row from span_corrupt's (inputs, targets): each sentinel in inputs -> its span in targets."""
    where = {s: i for i, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for tok in targets:
        if tok in where:
            current = spans.setdefault(tok, [])
        elif current is not None:
            current.append(tok)
    return [t for tok in inputs for t in (spans.get(tok, []) if tok in where else [tok])]


def _rows(batch: dict[str, Any], key: str, valid: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
    return [row[valid(row) if m is None else m.bool()].tolist() for row, m in zip(batch[key], _masks(batch, key))]


def _masks(batch: dict[str, Any], key: str) -> list[torch.Tensor | None]:
    m = batch.get("attention_mask") if key == "input_ids" else None
    return list(m) if m is not None else [None] * len(batch[key])


def _pad(rows: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


class TokenMasker:
    """Masks a padded batch (``input_ids``, optional ``attention_mask``) in ``mode`` mlm or span.

    ``__call__(batch)`` seeds its generator from (seed, counter) and advances the counter (its ``state_dict``);
    ``__call__(batch, key=k)`` seeds from (seed, k) and leaves the counter alone. ``unmask`` inverts either mode.
    """

    def __init__(
        self,
        tokenizer: Any,
        mode: Literal["mlm", "span"] = "mlm",
        mask_rate: float = 0.15,
        mask_ratio: float = 0.8,
        random_ratio: float = 0.1,
        mean_span_length: float = 3.0,
        seed: int = 0,
    ):
        self.mode, self.mask_rate, self.mask_ratio, self.random_ratio = mode, mask_rate, mask_ratio, random_ratio
        self.mean_span_length, self.seed, self.counter = mean_span_length, seed, 0
        self.special_ids = list(tokenizer.all_special_ids)
        self.mask_token_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.sentinels = sentinel_ids(tokenizer) if mode == "span" else []
        if mode == "mlm" and self.mask_token_id is None:
            raise ValueError("mlm masking needs a tokenizer with a mask token")
        if mode == "span" and not self.sentinels:
            raise ValueError("span masking needs a tokenizer with <extra_id_N> sentinel tokens")

    def __call__(self, batch: dict[str, Any], key: int | None = None) -> dict[str, Any]:
        if key is None:
            key, self.counter = self.counter, self.counter + 1
        g = _generator(self.seed, key)
        return self._mlm(batch, g) if self.mode == "mlm" else self._span(batch, g)

    def _mlm(self, batch: dict[str, Any], g: torch.Generator) -> dict[str, Any]:
        out = {k: v for k, v in batch.items() if k != "special_tokens_mask"}
        out["input_ids"], out["labels"] = mlm_mask(
            batch["input_ids"],
            g,
            mask_token_id=self.mask_token_id,
            special_ids=self.special_ids,
            vocab_size=self.vocab_size,
            mask_rate=self.mask_rate,
            mask_ratio=self.mask_ratio,
            random_ratio=self.random_ratio,
            attention_mask=batch.get("attention_mask"),
        )
        return out

    def _span(self, batch: dict[str, Any], g: torch.Generator) -> dict[str, Any]:
        inputs, targets = [], []
        for row in _rows(batch, "input_ids", lambda r: r != self.pad_id):
            tail = [self.eos_id] if row and row[-1] == self.eos_id else []
            x, y = span_corrupt(row[: len(row) - len(tail)], g, self.sentinels, self.mask_rate, self.mean_span_length)
            inputs.append(x + tail)
            targets.append(y + tail)
        device = batch["input_ids"].device
        out = {k: v for k, v in batch.items() if k not in _DROP_KEYS}  # T5 rebuilds decoder inputs from labels
        out["input_ids"] = _pad(inputs, self.pad_id, device)
        out["attention_mask"] = _pad([[1] * len(r) for r in inputs], 0, device)
        out["labels"] = _pad(targets, -100, device)
        return out

    def unmask(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch before masking (input_ids; span mode also labels = a copy of the text)."""
        if "labels" not in batch:
            return batch
        if self.mode == "mlm":
            labels = batch["labels"]
            return {**batch, "input_ids": torch.where(labels != -100, labels, batch["input_ids"])}
        rows = []
        for x, y in zip(
            _rows(batch, "input_ids", lambda r: r != self.pad_id), _rows(batch, "labels", lambda r: r != -100)
        ):
            tail = [self.eos_id] if x and y and x[-1] == y[-1] == self.eos_id else []
            rows.append(span_reconstruct(x[: len(x) - len(tail)], y[: len(y) - len(tail)], self.sentinels) + tail)
        device = batch["input_ids"].device
        return {
            **{k: v for k, v in batch.items() if k not in _DROP_KEYS},
            "input_ids": _pad(rows, self.pad_id, device),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, device),
            "labels": _pad(rows, -100, device),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter = int(state["counter"])


class MaskingCollator:
    """``masker(base(features))``. ``key="counter"``: dynamic masks (stock Trainer); ``"content"``: a batch's masks
    are a function of its token ids (repeatable evaluation)."""

    def __init__(self, base: Callable[[list[dict]], dict], masker: TokenMasker, key: str = "counter"):
        self.base, self.masker, self.key = base, masker, key

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(features)
        if self.key == "content":
            return self.masker(batch, key=hash(tuple(batch["input_ids"].flatten().tolist())) % 2**61)
        return self.masker(batch)


class TokenMaskingConfig(TechniqueConfig):
    name: Literal["token_masking"] = "token_masking"
    mode: Literal["mlm", "span"] = Field("mlm", description="mlm: BERT 80/10/10 masking; span: T5 span corruption.")
    mask_rate: float = Field(
        0.15, gt=0, lt=1, description="mlm: chance that a non-special token is selected; span: the noise density."
    )
    mask_ratio: float = Field(0.8, ge=0, le=1, description="mlm: share of selected tokens replaced by [MASK].")
    random_ratio: float = Field(0.1, ge=0, le=1, description="mlm: share of selected tokens replaced by a random one.")
    keep_ratio: float = Field(0.1, ge=0, le=1, description="mlm: share of selected tokens left unchanged.")
    mean_span_length: float = Field(
        3.0, ge=1, description="span: mean noise span length (spans capped at #sentinels)."
    )
    seed: int | None = Field(None, description="Seed of the per-batch mask generator; null: training.seed.")


@register_technique
class TokenMaskingTechnique(Technique):
    """Replaces/wraps the collator (so evaluation batches are masked too) and re-masks training batches in
    ``on_batch`` with a generator keyed by the batch counter (saved in checkpoints)."""

    name = "token_masking"
    Config = TokenMaskingConfig
    survey_section = "Data efficiency / Token masking"
    paper = (
        'Devlin et al. 2019, "BERT", arXiv 1810.04805 (mlm); Raffel et al. 2020, "Exploring the Limits of Transfer '
        'Learning with a Unified Text-to-Text Transformer", arXiv 1910.10683 (span)'
    )

    config: TokenMaskingConfig

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.seed = self.config.seed if self.config.seed is not None else 42
        self.tokenizer: Any = None
        self.masker: TokenMasker | None = None

    def validate(self, recipe: Any, env: Any) -> None:
        c = self.config
        total = c.mask_ratio + c.random_ratio + c.keep_ratio
        if abs(total - 1.0) > 1e-6:
            raise RecipeError("mask_ratio", f"mask_ratio + random_ratio + keep_ratio must sum to 1 (got {total:g})")
        need = {"mlm": "masked_lm", "span": "seq2seq"}[c.mode]
        if recipe.model.task not in ("auto", need):
            raise RecipeError("mode", f"mode {c.mode} needs task {need} (model.task is {recipe.model.task})")

    def training_args(self, args: Any) -> Any:
        if self.config.seed is None:
            self.seed = args.seed
        return args

    def on_dataset(self, dataset: Any, tokenizer: Any) -> Any:
        self.tokenizer = tokenizer
        return dataset

    def make_masker(self, tokenizer: Any) -> TokenMasker:
        c = self.config
        try:
            return TokenMasker(
                tokenizer, c.mode, c.mask_rate, c.mask_ratio, c.random_ratio, c.mean_span_length, seed=self.seed
            )
        except ValueError as e:
            raise RecipeError("mode", str(e)) from None

    def collator(self, collator: Any) -> Any:
        tok = self.tokenizer if self.tokenizer is not None else getattr(collator, "tokenizer", None)
        self.masker = self.make_masker(tok)
        if self.config.mode == "mlm":
            if not isinstance(collator, DataCollatorForLanguageModeling):
                raise RecipeError(
                    "mode",
                    "mlm needs a masked-LM model on text data (task masked_lm, e.g. builtin:tiny-bert); this recipe's "
                    "model and data are another task",
                )
            base = DataCollatorWithPadding(tok, pad_to_multiple_of=collator.pad_to_multiple_of)
        else:
            model = getattr(collator, "model", None)
            if (
                not isinstance(collator, DataCollatorForSeq2Seq)
                or not getattr(model, "config", None)
                or not (model.config.is_encoder_decoder)
            ):
                raise RecipeError("mode", "span needs an encoder-decoder model (task seq2seq, e.g. builtin:tiny-t5)")
            base = collator
        return MaskingCollator(base, self.make_masker(tok), key="content")

    def on_batch(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        if self.masker is None:
            return batch
        return self.masker(self.masker.unmask(batch))

    def state_dict(self) -> dict[str, Any]:
        return self.masker.state_dict() if self.masker is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.masker is not None and state:
            self.masker.load_state_dict(state)

    def report(self) -> dict[str, Any]:
        return {"seed": self.seed, "sentinels": len(self.masker.sentinels) if self.masker else None}
