"""Token importance, for importance-based token dropping in masked-LM encoders.

``importance`` -- Hou et al. 2022, "Token Dropping for Efficient BERT Pretraining", arXiv 2203.13240, for masked-LM
encoders. Each vocabulary id v has an importance m_v, the exponential moving average of its MLM loss (the official
implementation's rule, beta = 0.995, m_v initialised to 10)::

    m_v <- beta * m_v + (1 - beta) * mean(CE loss of the masked positions whose target is v in this batch)

The K positions with the largest m_{x_i} are kept in the middle layers (layers full_first..L-full_last-1, default
from L/2 on); special tokens always rank first, padding last. One index set per forward pass, shared by all middle
layers, so dropped tokens skip them and rejoin before the last layer(s). (The official code also lets the first
dropping layer's kept queries attend to all tokens; here kept tokens attend to kept tokens only.)
"""

from __future__ import annotations

import torch


class TokenImportance:
    """Per-vocabulary-id EMA of the MLM loss (Hou et al. 2022); specials always rank first, padding last.

    The scores follow the device of the ids they are used with, so selection needs no host round trip."""

    def __init__(self, vocab_size: int, special_ids=(), pad_id: int | None = None, init: float = 10.0, beta=0.995):
        self.scores = torch.full((vocab_size,), float(init))
        self.beta = beta
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[[i for i in special_ids if i is not None and i != pad_id and 0 <= i < vocab_size]] = True
        self.pad_id = pad_id

    def _to(self, device: torch.device) -> None:
        if self.scores.device != device:
            self.scores, self.special = self.scores.to(device), self.special.to(device)

    @torch.no_grad()
    def update(self, target_ids: torch.Tensor, losses: torch.Tensor) -> None:
        """One EMA step for each id among ``target_ids`` with the mean of its per-token losses (under DDP: over all
        processes' tokens)."""
        self._to(target_ids.device)
        ids = target_ids.reshape(-1)
        sums = torch.zeros_like(self.scores).index_add_(0, ids, losses.reshape(-1).float())
        counts = torch.bincount(ids, minlength=self.scores.numel()).float()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # one table for the global batch on every process: the same ranking everywhere, and the state that
            # process 0 checkpoints is every process's (exact resume under DDP)
            both = torch.stack([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[0], both[1]
        mean = sums / counts.clamp(min=1)
        self.scores.copy_(torch.where(counts > 0, self.beta * self.scores + (1 - self.beta) * mean, self.scores))

    @torch.no_grad()
    def select(self, input_ids: torch.Tensor, k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted indices (B, k) of the k highest-ranked positions of each row."""
        self._to(input_ids.device)
        rank = self.scores[input_ids].masked_fill(self.special[input_ids], float("inf"))
        dropped = input_ids == self.pad_id
        if attention_mask is not None:
            dropped |= attention_mask == 0
        rank = rank.masked_fill(dropped, float("-inf"))
        return torch.sort(rank, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
