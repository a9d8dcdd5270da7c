"""Near-duplicate removal before scoring: token n-gram Jaccard, MinHash LSH candidates, exact verification.

MinHash: Broder 1997, "On the resemblance and containment of documents"; MinHash near-duplicate removal of LM
training data: Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better", arXiv 2107.06499.

Near-duplicate removal (``dedup``, before scoring): each example's token ids become the set of its token n-grams
(``dedup_ngram`` tokens, hashed to 64 bits; a shorter example is one n-gram); two examples are duplicates when the
Jaccard similarity of their sets is >= ``dedup_threshold``. Candidate pairs come from MinHash LSH
(``dedup_num_perm`` hashes split into b bands of r rows, b and r minimising false positives + negatives at the
threshold; a pair of similarity s is a candidate with probability ``1 - (1 - s^r)^b``); every candidate pair is
verified with the exact Jaccard, so nothing below the threshold is removed. Duplicates are grouped into connected
components and each component keeps its lowest index.
"""

from __future__ import annotations

import numpy as np


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: well-spread 64-bit hashes of 64-bit keys (uint64 array arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingles(ids: list[int], n: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of the token n-grams of ``ids`` (one n-gram if shorter than n)."""
    a = np.asarray(ids, dtype=np.uint64)
    n = max(1, min(n, len(a)))
    m = max(1, len(a) - n + 1)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(min(n, len(a))):
        h = _mix(h ^ a[j : j + m])  # chained: the hash depends on the tokens' order
    return np.unique(h)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands b and rows r (b * r <= num_perm) minimising the false-positive plus false-negative area of the
    candidate probability ``1 - (1 - s^r)^b`` around ``threshold`` (equal weights)."""
    s = np.linspace(0, 1, 1001)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - s**r) ** b
            err = (p[s < threshold].sum() + (1 - p[s >= threshold]).sum()) / len(s)
            if err < best_err:
                best, best_err = (b, r), err
    return best


def near_duplicates(rows: list[list[int]], threshold: float, ngram: int = 5, num_perm: int = 128) -> np.ndarray:
    """Boolean keep-mask: False for every example in a group of near-duplicates except the group's first."""
    sets = [shingles(r, ngram) for r in rows]
    seeds = _mix(np.arange(1, num_perm + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    sigs = np.stack([_mix(s[None, :] ^ seeds[:, None]).min(axis=1) for s in sets]) if sets else None
    bands, r = lsh_params(threshold, num_perm)
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(bands if sets else 0):
        buckets: dict[bytes, list[int]] = {}
        for i, sig in enumerate(sigs[:, band * r : (band + 1) * r]):
            buckets.setdefault(sig.tobytes(), []).append(i)
        for members in buckets.values():
            for x, i in enumerate(members):
                for j in members[x + 1 :]:
                    a, b = find(i), find(j)
                    if a != b and jaccard(sets[i], sets[j]) >= threshold:
                        parent[max(a, b)] = min(a, b)  # the root is the group's lowest index
    return np.array([find(i) == i for i in range(len(rows))], dtype=bool)
