"""Data-pruning scores, one batched ``Dataset.map`` function each (Marion et al. 2023; Paul et al. 2021).

Scores (per tokenized example, computed with a batched ``Dataset.map``):

- ``length``: the number of tokens.
- ``perplexity`` (Marion et al. 2023, "When Less is More: Investigating Data Pruning for Pretraining LLMs at
  Scale", arXiv 2309.04564): ``exp(mean_t NLL_t)`` under a reference causal LM (``reference_model``: a local model
  folder, e.g. an earlier run's ``output_dir``), over the example's targets: its labels != -100 after the shift
  (SFT: the response only), or all its ``input_ids`` when it has no token labels aligned with them (masked LM,
  classification, seq2seq).
- ``el2n`` (Paul et al. 2021, "Deep Learning on a Data Diet", arXiv 2107.07075): ``EL2N(x, y) =
  E_w ||softmax(f_w(x)) - onehot(y)||_2``, the error-vector norm of a proxy model ``f_w`` trained for only
  ``proxy_steps`` steps (AdamW, the run's lr and batch size unless set) from the run's own initialisation
  (``proxy_config_overrides`` can shrink it), averaged over ``proxy_runs`` seeds. For sequence tasks the norm is
  averaged over the example's target tokens (labels != -100, shifted like the model's loss).

Scoring saves and restores every RNG (``preserved_rng``), so the run's model initialisation does not depend on
whether the scores were computed or reused.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..selective_backprop import loss_shifts_labels, per_example_loss


def el2n_from_logits(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(el2n, targets)``: ``||softmax(logits) - onehot(y)||_2`` averaged over each example's targets."""
    if logits.dim() == 2:  # classification: one "token" per example
        logits, labels = logits[:, None], labels[:, None]
    elif shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    p = torch.softmax(logits.float(), dim=-1)
    valid = labels != -100
    p_y = p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # ||p - e_y||^2 = sum_k p_k^2 - 2 p_y + 1
    norm = ((p * p).sum(-1) - 2 * p_y + 1).clamp(min=0).sqrt()
    targets = valid.sum(1).float()
    return (norm * valid).sum(1) / targets.clamp(min=1), targets


def _targets(batch: dict[str, list]) -> list[list[int]]:
    """Token labels where they are aligned with the input ids (causal LM, SFT), else the input ids themselves."""
    labels = batch.get("labels") or [None] * len(batch["input_ids"])
    return [t if isinstance(t, list) and len(t) == len(i) else i for t, i in zip(labels, batch["input_ids"])]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def length_batch(batch: dict[str, list]) -> dict[str, list]:
    return {"score": [float(len(r)) for r in batch["input_ids"]]}


def perplexity_batch(batch: dict[str, list], model: torch.nn.Module, device: torch.device) -> dict[str, list]:
    """Per-example perplexity under ``model`` (right-padded, no grad); NaN without a target token."""
    ids, targets = batch["input_ids"], _targets(batch)
    input_ids = _pad(ids, 0).to(device)
    mask = _pad([[1] * len(r) for r in ids], 0).to(device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        nll, n = per_example_loss(logits, _pad(targets, -100).to(device), loss_shifts_labels(model))
    ppl = torch.where(n > 0, nll.double().exp(), torch.full_like(nll.double(), float("nan")))
    return {"score": ppl.cpu().tolist()}


def el2n_batch(batch: dict[str, list], model: torch.nn.Module, collator: Any, device: torch.device) -> dict:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    inputs = {k: v.to(device) for k, v in collator(rows).items()}
    with torch.no_grad():
        logits = model(**inputs).logits
        score, n = el2n_from_logits(logits, inputs["labels"], loss_shifts_labels(model))
    return {"score": torch.where(n > 0, score, torch.full_like(score, float("nan"))).cpu().tolist()}


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Scoring must not change what the run draws next (its model init, data order)."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _map(dataset: Any, fn: Any, batch_size: int, fingerprint: str, **fn_kwargs: Any) -> np.ndarray:
    """Batched ``Dataset.map`` with a fingerprint of our own (models do not hash), so datasets' cache files are
    reused when the dataset has them."""
    out = dataset.map(
        fn,
        batched=True,
        fn_kwargs=fn_kwargs,
        batch_size=batch_size,
        remove_columns=dataset.column_names,
        new_fingerprint=fingerprint,
        desc="data_pruning: score",
    )
    return np.asarray(out["score"], dtype=np.float64)
