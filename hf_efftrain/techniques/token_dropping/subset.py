"""One layer run on a subset of the sequence's tokens, the other tokens passed through unchanged: the layerwise
gather/scatter of random-LTD (Yao et al. 2022, "Random-LTD: Random and Layerwise Token Dropping Brings Efficient
Training for Large-scale Transformers", arXiv 2211.11586), used by both strategies. For a sorted index set I_l::

    h_out[:, I_l] = Layer_l(h_in[:, I_l]; mask[I_l, I_l], rope[I_l])      h_out[:, not I_l] = h_in[:, not I_l]

Sorting keeps causal order, so the causal mask of the subsequence is the original mask restricted to rows and
columns I_l; rotary position embeddings (cos, sin) are gathered with the tokens, so a kept token keeps its original
position.

A ``DropPolicy`` per layer class names the arguments that are gathered (``register_drop_policy`` adds one); packed
rows (flash attention varlen) get their position ids and segment boundaries renumbered over the kept tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DropPolicy:
    """How one decoder/encoder layer class takes its sequence-shaped arguments (names in its ``forward``)."""

    hidden: str = "hidden_states"
    mask: str = "attention_mask"  # 4D (B|1, heads|1, S, S) bool/additive, 2D (B, S) padding mask, or None
    rope: str | None = None  # (cos, sin), each (B|1, S, D), gathered with the tokens
    position_ids: str | None = None  # only read by attention kernels (flash varlen): renumbered per segment


_POLICIES: dict[str, DropPolicy] = {}


def register_drop_policy(layer_class: str, policy: DropPolicy) -> None:
    _POLICIES[layer_class] = policy


for _n in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"):
    register_drop_policy(_n, DropPolicy(rope="position_embeddings", position_ids="position_ids"))
register_drop_policy("GPT2Block", DropPolicy(position_ids="position_ids"))  # learned positions: added before layer 0
for _n in ("BertLayer", "RobertaLayer"):
    register_drop_policy(_n, DropPolicy())


def gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[b, idx[b]] along ``dim`` (x's batch may be 1 and is broadcast to idx's)."""
    x = x.expand(idx.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    index = idx.view(shape).expand(*x.shape[:dim], idx.shape[1], *x.shape[dim + 1 :])
    return torch.gather(x, dim, index)


def gather_mask(mask: Any, idx: torch.Tensor) -> Any:
    """Restrict an attention mask to the kept rows and columns."""
    if mask is None:
        return None  # sdpa's is_causal on a sorted subsequence is the restricted causal mask
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"token_dropping cannot gather a {type(mask).__name__} mask (flex attention); use sdpa/eager")
    if mask.dim() == 2:
        return gather_seq(mask, idx, 1)
    if mask.dim() == 4:
        return gather_seq(gather_seq(mask, idx, 2), idx, 3)
    raise ValueError(f"unexpected attention mask shape {tuple(mask.shape)}")


def segment_positions(position_ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... per packed segment among the kept tokens: flash attention infers segments from restarts."""
    pos = position_ids.expand(idx.shape[0], -1)
    restart = torch.ones_like(pos, dtype=torch.long)
    restart[:, 1:] = (pos[:, 1:] - pos[:, :-1] != 1).long()
    seg = gather_seq(restart.cumsum(1), idx)
    new = torch.ones_like(seg, dtype=torch.bool)
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    ar = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
    return ar - torch.where(new, ar, 0).cummax(1).values


def flash_varlen_kwargs(positions: torch.Tensor) -> dict[str, Any]:
    """cu_seq_lens / max_length over the flattened (B, K) kept tokens, a segment starting at each position 0."""
    starts = (positions.reshape(-1) == 0).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


class _Args:
    """A call's arguments by name, whether passed positionally, by keyword, or inside ``**kwargs``."""

    def __init__(self, sig: inspect.Signature, args: tuple, kwargs: dict):
        self.bound = sig.bind(*args, **kwargs)
        self.var = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)

    def get(self, name: str) -> Any:
        a = self.bound.arguments
        return a[name] if name in a else a.get(self.var, {}).get(name) if self.var else None

    def set(self, name: str, value: Any) -> None:
        if name in self.bound.signature.parameters:
            self.bound.arguments[name] = value
        elif self.var and name in self.bound.arguments.get(self.var, {}):
            self.bound.arguments[self.var][name] = value

    def set_all(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.set(name, value)


def run_on_subset(forward: Any, sig: inspect.Signature, policy: DropPolicy, idx: torch.Tensor, args, kwargs):
    """Run ``forward`` on the tokens ``idx`` (B, K) and scatter its output back; others pass through unchanged."""
    call = _Args(sig, args, kwargs)
    hidden = call.get(policy.hidden)
    call.set(policy.hidden, gather_seq(hidden, idx))
    call.set(policy.mask, gather_mask(call.get(policy.mask), idx))
    if policy.rope and call.get(policy.rope) is not None:
        call.set(policy.rope, tuple(gather_seq(t, idx) for t in call.get(policy.rope)))
    if policy.position_ids and call.get(policy.position_ids) is not None:
        positions = segment_positions(call.get(policy.position_ids), idx)
        call.set(policy.position_ids, positions)
        if call.get("cu_seq_lens_q") is not None:  # flash varlen over packed rows: boundaries of the kept tokens
            call.set_all(flash_varlen_kwargs(positions))
    elif call.get("cu_seq_lens_q") is not None:
        raise ValueError("token_dropping needs position_ids alongside cu_seq_lens (packed flash attention)")
    out = forward(*call.bound.args, **call.bound.kwargs)
    sub = out[0] if isinstance(out, tuple) else out
    full = hidden.scatter(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), sub.to(hidden.dtype))
    return (full, *out[1:]) if isinstance(out, tuple) else full
