"""Data pruning: score every training example, optionally drop near-duplicates, keep a fraction by score.

Marion et al. 2023, "When Less is More: Investigating Data Pruning for Pretraining LLMs at Scale", arXiv 2309.04564
(perplexity under a reference model); Paul et al. 2021, "Deep Learning on a Data Diet", arXiv 2107.07075 (EL2N).
The parts, by responsibility:

- ``scoring.py``: the scores ``length``, ``perplexity`` and ``el2n``, each a batched ``Dataset.map`` function.
- ``dedup.py``: near-duplicate removal before scoring (token n-gram Jaccard, MinHash LSH, exact verification).
- ``selection.py``: how many examples are kept and which, per strategy (``top``, ``bottom``, ``middle``, ``random``).
- here: the config and the technique, whose ``on_dataset`` hook runs them (loading the reference model, training the
  el2n proxies), and the score cache.

Scoring runs ``Dataset.map(batched=True, new_fingerprint=<from the key>)``, so datasets' own cache files are reused
when the data has them. Scores are saved in ``output_dir/data_pruning/scores.{json,npz}``, keyed by the source
dataset's fingerprint and the scoring settings; a later run with the same key reuses them (no reference model
loaded, no proxy trained). The kept indices go to ``kept_indices.json``. Scoring saves and restores every RNG, so
the run's model initialisation does not depend on whether the scores were computed or reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from ...core.registry import register_technique
from ...core.technique import Technique, TechniqueConfig
from ...errors import RecipeError
from .dedup import jaccard, lsh_params, near_duplicates, shingles  # noqa: F401  (re-exported)
from .scoring import (  # noqa: F401  (re-exported too: the functional cores are imported from the package)
    _device,
    _map,
    el2n_batch,
    el2n_from_logits,
    length_batch,
    perplexity_batch,
    preserved_rng,
)
from .selection import keep_count, select_indices  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

SCORES = ("length", "perplexity", "el2n", "none")
DEFAULT_STRATEGY = {"length": "top", "perplexity": "middle", "el2n": "top", "none": "top"}
# How often the expensive work ran in this process (tests check that a second run reuses the saved scores).
COUNTERS = {"scorings": 0, "reference_model_loads": 0, "proxy_trainings": 0}


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DataPruningConfig(TechniqueConfig):
    name: Literal["data_pruning"] = "data_pruning"
    score: Literal[SCORES] = Field(
        description="length (tokens), perplexity (under reference_model), el2n (proxy run), none (dedup only)"
    )
    keep_fraction: float = Field(0.5, gt=0, le=1, description="Share of examples kept (after dedup; round half up).")
    strategy: Literal["top", "bottom", "middle", "random"] | None = Field(
        None,
        description="Which scores to keep; default per score: el2n top (Paul et al.), perplexity middle "
        "(Marion et al.), length top.",
    )
    seed: int | None = Field(None, description="Seed of the random strategy and the el2n proxy; default training.seed")
    reference_model: str | None = Field(
        None,
        description="perplexity: a local causal-LM folder (save_pretrained output or an earlier run's output_dir)",
    )
    batch_size: int = Field(16, ge=1, le=65536, description="Examples per forward pass when scoring.")
    proxy_steps: int = Field(50, ge=1, le=1_000_000, description="el2n: training steps of each proxy model.")
    proxy_runs: int = Field(1, ge=1, le=16, description="el2n: proxy models (seeds seed..seed+k-1) averaged.")
    proxy_learning_rate: float | None = Field(None, gt=0, description="el2n: proxy lr; default training.learning_rate")
    proxy_batch_size: int | None = Field(
        None, ge=1, description="el2n: proxy batch size; default training.per_device_train_batch_size"
    )
    proxy_config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="el2n: model config fields changed for the proxy, e.g. num_hidden_layers"
    )
    dedup: bool = Field(False, description="Remove near-duplicates (token n-gram Jaccard, MinHash LSH) first.")
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity at which two are duplicates.")
    dedup_ngram: int = Field(5, ge=1, le=64, description="Tokens per n-gram shingle.")
    dedup_num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations (more: fewer misses).")
    reuse_scores: bool = Field(True, description="Reuse scores saved in output_dir/data_pruning with the same key.")


@register_technique
class DataPruningTechnique(Technique):
    """Prunes the tokenized training set in ``on_dataset`` (under main_process_first: rank 0 scores and saves,
    the other ranks reuse the saved scores)."""

    name = "data_pruning"
    Config = DataPruningConfig
    survey_section = "Data efficiency / Data pruning"
    paper = (
        'Marion et al. 2023, "When Less is More: Investigating Data Pruning for Pretraining LLMs at Scale", '
        'arXiv 2309.04564; Paul et al. 2021, "Deep Learning on a Data Diet", arXiv 2107.07075'
    )

    config: DataPruningConfig

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.recipe: Any = None
        self.output_dir: Path | None = None
        self.seed = self.config.seed if self.config.seed is not None else 42
        self.strategy = self.config.strategy or DEFAULT_STRATEGY[self.config.score]
        self.facts: dict[str, Any] = {}
        self.kept_indices: np.ndarray | None = None  # positions in the dataset given to on_dataset
        self.path = ""  # "techniques[i]", for errors raised in on_dataset

    def validate(self, recipe: Any, env: Any) -> None:
        c = self.config
        self.recipe, self.output_dir = recipe, Path(recipe.output_dir) / "data_pruning"
        self.path = f"techniques[{recipe.technique_names().index(self.name)}]"
        if c.seed is None:
            self.seed = int(recipe.training.get("seed", 42))
        if c.score == "perplexity":
            if not c.reference_model:
                raise RecipeError("reference_model", "score: perplexity needs a local causal-LM folder")
            if not (Path(c.reference_model) / "config.json").is_file():
                raise RecipeError("reference_model", f"no model folder (config.json) at {c.reference_model!r}")
        elif c.reference_model:
            raise RecipeError("reference_model", "only used by score: perplexity")
        if c.score == "none" and (c.keep_fraction < 1 or not c.dedup):
            raise RecipeError("score", "score: none only deduplicates: set dedup: true and keep_fraction: 1.0")
        if c.score == "el2n" and recipe.model.task == "masked_lm":
            raise RecipeError("score", "el2n needs labels in the data; masked_lm has none (use length or perplexity)")

    # ---- the hook -------------------------------------------------------------------------------------------
    def on_dataset(self, dataset: Any, tokenizer: Any) -> Any:
        c = self.config
        n_before = len(dataset)
        source = getattr(dataset, "_fingerprint", None) or _hash(dataset["input_ids"])
        scoring = c.model_dump(exclude={"keep_fraction", "strategy", "reuse_scores", "seed"})
        seed = self.seed if c.score == "el2n" else None  # the random strategy's seed needs no new scores
        key = _hash(source, n_before, scoring, seed, _model_files(c.reference_model), self._model_id())
        # Other ranks always take rank 0's fresh scores (main_process_first): every rank must keep the same rows.
        cached = self._load(key) if c.reuse_scores or not _is_main() else None
        self.facts = {"scores_reused": cached is not None, "cache_key": key}
        if cached is not None:
            candidates, scores = cached
        else:
            with preserved_rng():
                candidates = np.arange(n_before)
                if c.dedup:
                    keep = near_duplicates(dataset["input_ids"], c.dedup_threshold, c.dedup_ngram, c.dedup_num_perm)
                    candidates = np.flatnonzero(keep)
                scoped = dataset if len(candidates) == n_before else dataset.select(candidates)
                scores = self._score(scoped, tokenizer, _hash(key, "score"))
            self._save(key, source, candidates, scores)
        kept = candidates[select_indices(scores, c.keep_fraction, self.strategy, self.seed)]
        self.kept_indices = kept
        self._save_kept(kept)
        finite = scores[~np.isnan(scores)]
        kept_scores = scores[np.isin(candidates, kept)]
        self.facts.update(
            examples_before=n_before,
            examples_after_dedup=len(candidates),
            duplicates_removed=n_before - len(candidates),
            examples_after=len(kept),
            score=c.score,
            strategy=self.strategy,
            keep_fraction=c.keep_fraction,
            rounding="n_keep = max(1, floor(keep_fraction * n_after_dedup + 0.5))",
            score_stats=_stats(finite),
            kept_score_stats=_stats(kept_scores[~np.isnan(kept_scores)]),
            scores_path=str(self.output_dir / "scores.npz") if self.output_dir else None,
        )
        logger.info("data_pruning: %d -> %d examples (%s, %s)", n_before, len(kept), c.score, self.strategy)
        return dataset.select(kept.tolist())

    def report(self) -> dict[str, Any]:
        return dict(self.facts)

    def _error(self, field: str, message: str) -> RecipeError:
        """Errors found after validate (in on_dataset) carry the full recipe path themselves."""
        return RecipeError(f"{self.path}.{field}" if self.path else field, message)

    # ---- scoring --------------------------------------------------------------------------------------------
    def _score(self, dataset: Any, tokenizer: Any, fingerprint: str) -> np.ndarray:
        c = self.config
        COUNTERS["scorings"] += 1
        if c.score in ("length", "none"):
            return _map(dataset, length_batch, 1000, fingerprint)
        device = _device()
        if c.score == "perplexity":
            model = self._reference_model(dataset, device)
            scores = _map(dataset, perplexity_batch, c.batch_size, fingerprint, model=model, device=device)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the run's own model is loaded next
            return scores
        runs = []
        for r in range(c.proxy_runs):
            model, collator = self._proxy(dataset, tokenizer, self.seed + r, device)
            kwargs = {"model": model, "collator": collator, "device": device}
            runs.append(_map(dataset, el2n_batch, c.batch_size, f"{fingerprint}{r}", **kwargs))
        return np.mean(runs, axis=0)

    def _reference_model(self, dataset: Any, device: torch.device) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        COUNTERS["reference_model_loads"] += 1
        try:
            model = AutoModelForCausalLM.from_pretrained(self.config.reference_model)
        except Exception as e:
            raise self._error(
                "reference_model", f"cannot load a causal LM from it ({type(e).__name__}: {e})"
            ) from None
        vocab = model.get_input_embeddings().num_embeddings
        top = max(max(r) for r in dataset["input_ids"])
        if top >= vocab:
            raise self._error("reference_model", f"its vocabulary ({vocab}) lacks token id {top}: other tokenizer?")
        return model.to(device).eval()

    def _model_id(self) -> Any:
        if self.recipe is None or self.config.score != "el2n":
            return None
        m, t = self.recipe.model, self.recipe.training
        return [m.model_dump(mode="json"), t.get("learning_rate"), t.get("per_device_train_batch_size")]

    def _proxy(self, dataset: Any, tokenizer: Any, seed: int, device: torch.device) -> tuple[Any, Any]:
        """A fresh copy of the run's model (same config and init), trained ``proxy_steps`` steps."""
        import transformers

        from ...core.data import checkpoint_head, make_collator
        from ...core.model_loading import load_config, load_model

        if self.recipe is None:
            raise self._error("score", "el2n needs validate(recipe, env) first (the model to train a proxy of)")
        c, recipe = self.config, self.recipe
        COUNTERS["proxy_trainings"] += 1
        config = load_config(recipe, tokenizer)
        task = _task(recipe, dataset, config)
        if task == "masked_lm":
            raise self._error("score", "el2n needs labels in the data; masked_lm has none (use length or perplexity)")
        head = checkpoint_head(config) if task == "classification" and recipe.model.loads_weights() else None
        if task == "classification":  # sized as the run's own head (core/data/labels.py)
            config.num_labels = recipe.model.num_labels or max(int(max(dataset["labels"])) + 1, len(head or ()))
            config.pad_token_id = tokenizer.pad_token_id
        for k, v in c.proxy_config_overrides.items():
            if not hasattr(config, k):
                raise self._error(f"proxy_config_overrides.{k}", f"not a field of {type(config).__name__}")
            setattr(config, k, v)
        kwargs = {"attn_implementation": recipe.model.attn_implementation} if recipe.model.attn_implementation else {}
        if head is not None and len(head) != config.num_labels:
            kwargs["ignore_mismatched_sizes"] = True  # the checkpoint's head is of another size: a new one
        transformers.set_seed(seed)
        model = load_model(recipe, config, task, kwargs).to(device).train()
        collator = make_collator(task, tokenizer, model)
        lr = c.proxy_learning_rate or float(recipe.training.get("learning_rate", 5e-5))
        bs = c.proxy_batch_size or int(recipe.training.get("per_device_train_batch_size", 8))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        rows = dataset.select_columns(
            [k for k in ("input_ids", "attention_mask", "labels") if k in dataset.column_names]
        )
        g, order = torch.Generator().manual_seed(seed), []
        for _ in range(c.proxy_steps):
            if len(order) < min(bs, len(rows)):  # epochs of seeded permutations
                order += torch.randperm(len(rows), generator=g).tolist()
            idx, order = order[:bs], order[bs:]
            batch = {k: v.to(device) for k, v in collator([rows[i] for i in idx]).items()}
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model.eval(), collator

    # ---- persistence ----------------------------------------------------------------------------------------
    def _load(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        if self.output_dir is None:
            return None
        meta, arrays = self.output_dir / "scores.json", self.output_dir / "scores.npz"
        try:
            if json.loads(meta.read_text())["key"] != key:
                return None
            with np.load(arrays) as z:
                return z["candidates"], z["scores"]
        except (OSError, KeyError, ValueError):
            return None

    def _save(self, key: str, source: str, candidates: np.ndarray, scores: np.ndarray) -> None:
        if self.output_dir is None or not _is_main():
            return
        from ...cache import write_json_atomic

        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.output_dir / f".scores.{os.getpid()}.npz"
        np.savez(tmp, candidates=candidates, scores=scores)
        os.replace(tmp, self.output_dir / "scores.npz")
        write_json_atomic(  # written last: its key makes the npz valid
            self.output_dir / "scores.json",
            {
                "key": key,
                "source_fingerprint": source,
                "examples": int(len(scores)),
                "config": self.config.model_dump(),
            },
        )

    def _save_kept(self, kept: np.ndarray) -> None:
        if self.output_dir is None or not _is_main():
            return
        from ...cache import write_json_atomic

        write_json_atomic(
            self.output_dir / "kept_indices.json",
            {"strategy": self.strategy, "keep_fraction": self.config.keep_fraction, "indices": kept.tolist()},
        )


def _task(recipe: Any, dataset: Any, config: Any) -> str:
    if recipe.model.task != "auto":
        return "causal_lm" if recipe.model.task == "sft" else recipe.model.task
    if "labels" not in dataset.column_names:
        return "masked_lm"
    if isinstance(dataset[0]["labels"], list):
        return "seq2seq" if config.is_encoder_decoder else "causal_lm"
    return "classification"


def _stats(x: np.ndarray) -> dict[str, float] | None:
    if len(x) == 0:
        return None
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "median": float(np.median(x))}


def _model_files(path: str | None) -> Any:
    """Identity of a reference model: its folder and its weight files' names and modification times."""
    if not path:
        return None
    p = Path(path)
    return [str(p.resolve()), [(f.name, f.stat().st_mtime_ns) for f in sorted(p.glob("*.safetensors"))]]


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
