"""Mask math of sparse training: the pruning schedule, magnitude masks, RigL's drop/grow, ERK densities, 2:4 masks.

Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878, Eq. 1). After step t,
for t = t0, t0 + dt, ..., t0 + n*dt (``start_step``, ``update_every``, ``end_step`` = t0 + n*dt)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3

and each mask keeps the largest |w|: per layer (``distribution: uniform`` or ``erk``), or with one threshold over
all layers (``global``). Exactly ``round(s * numel)`` weights of a layer (or of all layers, global) are zero.

RigL (Evci et al. 2020, "Rigging the Lottery", arXiv 1911.11134, Algorithm 1). From a random mask at the target
sparsity, at every step t with t mod dT == 0 and t < T_end (``update_every``, ``end_step``), per layer::

    f(t) = alpha / 2 * (1 + cos(pi * t / T_end));   k = floor(f(t) * n_active)
    drop = the k active weights with the smallest |theta|
    grow = the k connections outside the remaining active set with the largest |dense grad of L_t|

so sparsity stays constant. Grown connections that were inactive start at zero with a fresh optimizer state
(a connection dropped and regrown in the same update keeps its weight, as in the reference implementation).
Layer densities: ``uniform`` (default, every layer at s) or ``erk``, Erdos-Renyi-Kernel: density_l proportional to
(n_in + n_out) / (n_in * n_out), scaled so all layers together keep (1 - s) of the weights; layers whose density
would exceed 1 stay dense (RigL's ``sparse_utils``). The paper's best numbers use ERK.

2:4 (``pattern: "2:4"``, NVIDIA's semi-structured sparsity; Mishra et al. 2021, "Accelerating Sparse Deep Neural
Networks", arXiv 2104.08378): in every group of 4 consecutive weights along the input dimension keep the 2 of
largest |w| (sparsity 0.5), set at ``start_step`` and then fixed.

All pure functions of tensors, except ``sparse_modules``, which picks the layers that get masks.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...core.layers import layer_stacks


def cubic_sparsity(step: int, final: float, initial: float = 0.0, start: int = 0, end: int = 1) -> float:
    """Zhu & Gupta's Eq. 1: ``initial`` before ``start``, ``final`` from ``end`` on, the cubic in between."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def rigl_drop_fraction(step: int, alpha: float, end: int) -> float:
    """RigL's cosine decay of the fraction of active weights swapped: alpha/2 * (1 + cos(pi t / T_end))."""
    return alpha / 2 * (1 + math.cos(math.pi * min(step, end) / end))


def magnitude_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``numel - round(sparsity * numel)`` largest scores (exact count; ties broken by topk)."""
    n = scores.numel()
    keep = n - round(sparsity * n)
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten().float(), keep, sorted=False).indices] = True
    return mask.view_as(scores)


def global_magnitude_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all layers: exactly ``round(sparsity * total)`` zeros in total."""
    flat = torch.cat([s.flatten().float().to(next(iter(scores.values())).device) for s in scores.values()])
    mask = magnitude_mask(flat, sparsity)
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = mask[offset : offset + s.numel()].view_as(s).to(s.device)
        offset += s.numel()
    return out


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive scores along the last dimension (2:4 by default)."""
    if scores.shape[-1] % m:
        raise ValueError(f"the last dimension ({scores.shape[-1]}) must be a multiple of {m} for {n}:{m} sparsity")
    groups = scores.reshape(-1, m).float()
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return mask.view(scores.shape)


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi(-Kernel) densities ~ sum(shape)/prod(shape), scaled so the total kept fraction is ``density``."""
    dense: set[str] = set()
    while True:
        budget, divisor, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if name in dense:
                budget -= numel * (1 - density)  # a dense layer spends its share of zeros elsewhere
            else:
                budget += numel * density
                raw[name] = sum(shape) / numel
                divisor += raw[name] * numel
        if not raw:
            return dict.fromkeys(shapes, 1.0)
        eps = budget / divisor
        top = max(raw.values())
        if top * eps <= 1:
            return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
        dense.update(name for name, p in raw.items() if p == top)


def rigl_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """One RigL drop/grow on one layer; returns the new mask (same number of active weights)."""
    m = mask.flatten()
    k = int(fraction * int(m.sum()))  # floor, as the reference implementation
    if k == 0:
        return mask.clone()
    drop_scores = torch.where(m, weight.detach().abs().flatten().float(), torch.inf)
    remaining = m.clone()
    remaining[torch.topk(drop_scores, k, largest=False).indices] = False
    grow_scores = torch.where(remaining, -torch.inf, grad.abs().flatten().float())
    new = remaining.clone()
    new[torch.topk(grow_scores, k).indices] = True
    return new.view_as(mask)


def _input_last(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor with the input dimension last (Conv1D stores its weight as [in, out])."""
    return t.t() if isinstance(module, Conv1D) else t


def sparse_modules(
    model: nn.Module, include: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """Linear/Conv1D modules to sparsify, by full name: by default those inside the transformer blocks (so no
    embeddings, no LM head); ``include`` regexes (re.search) select by name anywhere instead; ``exclude`` removes."""
    if include is None:
        inside = {id(m) for stack in layer_stacks(model).values() for m in stack.modules()}
        chosen = {n: m for n, m in model.named_modules() if id(m) in inside and isinstance(m, (nn.Linear, Conv1D))}
    else:
        chosen = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and any(re.search(p, n) for p in include)
        }
    return {n: m for n, m in chosen.items() if not any(re.search(p, n) for p in exclude)}
