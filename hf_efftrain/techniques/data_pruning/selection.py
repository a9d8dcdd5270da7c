"""Which examples a strategy keeps, and how many (the selection step of data pruning).

Strategies as in the papers: ``top`` keeps the highest scores (EL2N, Paul et al. 2021, "Deep Learning on a Data
Diet", arXiv 2107.07075), ``middle`` the scores around the median (perplexity, Marion et al. 2023, "When Less is
More: Investigating Data Pruning for Pretraining LLMs at Scale", arXiv 2309.04564).

Selection keeps ``n_keep = max(1, floor(keep_fraction * n + 0.5))`` examples (round half up), ``n`` counted after
deduplication: ``top`` the highest scores, ``bottom`` the lowest, ``middle`` the ``n_keep`` around the median
(sorted ascending, starting at ``floor((n - n_keep) / 2)``), ``random`` a seeded uniform sample (the score is still
computed, for the report). Ties go to the lower index; examples without a target token (score NaN) are kept last.
"""

from __future__ import annotations

import math

import numpy as np


def keep_count(n: int, keep_fraction: float) -> int:
    """``max(1, floor(keep_fraction * n + 0.5))``, at most n (round half up)."""
    return min(n, max(1, math.floor(keep_fraction * n + 0.5)))


def select_indices(scores: np.ndarray, keep_fraction: float, strategy: str, seed: int = 0) -> np.ndarray:
    """Sorted positions of the examples to keep."""
    scores = np.asarray(scores, dtype=np.float64)
    n, n_keep = len(scores), keep_count(len(scores), keep_fraction)
    if strategy == "random":
        return np.sort(np.random.default_rng(seed).permutation(n)[:n_keep])
    valid = np.flatnonzero(~np.isnan(scores))
    key = scores[valid] if strategy != "top" else -scores[valid]
    order = valid[np.argsort(key, kind="stable")]  # stable: ties keep the lower index first
    if strategy == "middle":
        start = (len(order) - min(n_keep, len(order))) // 2
        order = np.concatenate([order[start:], order[:start]])
    order = np.concatenate([order, np.flatnonzero(np.isnan(scores))])
    return np.sort(order[:n_keep])
