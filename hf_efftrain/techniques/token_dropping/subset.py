"""One layer run on a subset of the sequence's tokens, the other tokens passed through unchanged: the layerwise
gather/scatter of random-LTD (Yao et al. 2022, "Random-LTD: Random and Layerwise Token Dropping Brings Efficient
Training for Large-scale Transformers", arXiv 2211.11586), used by both strategies. For a sorted index set I_l::

    h_out[:, I_l] = Layer_l(h_in[:, I_l]; mask[I_l, I_l], rope[I_l])      h_out[:, not I_l] = h_in[:, not I_l]

Sorting keeps causal order, so the causal mask of the subsequence is the original mask restricted to rows and
columns I_l; rotary position embeddings (cos, sin) are gathered with the tokens, so a kept token keeps its original
position.

The gather and the scatter are one ``index_select`` / ``index_copy`` each on the flattened (B*S, H) view (rows
``b * S + I_l[b]``): a row copy, whose backward is a row copy too (``index_add`` into zeros, ``index_fill``), where an
element-wise ``gather`` with an expanded (B, K, H) index costs a scatter-add per element in the backward. Nothing
here reads a tensor on the host, so it adds no device sync and no graph break under ``torch.compile``.

A ``DropPolicy`` per layer class names the arguments that are gathered (``register_drop_policy`` adds one). Position
ids are only read by flash-attention kernels (rotary embeddings arrive precomputed): for those, packed rows get
their position ids renumbered per segment over the kept tokens and their varlen boundaries ``cu_seq_lens`` counted
over the kept tokens (``searchsorted``: a fully dropped segment stays, with length 0); other kernels get the kept
tokens' own position ids.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

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


class Selection(NamedTuple):
    """The kept tokens of one layer: ``idx`` (B, K) sorted positions per row; ``flat`` (B*K,) the same tokens as
    rows of the flattened (B*S, ...) view, ascending."""

    idx: torch.Tensor
    flat: torch.Tensor

    @classmethod
    def of(cls, idx: torch.Tensor, seq_len: int, offsets: torch.Tensor | None = None) -> Selection:
        """``offsets``: the rows' starts ``b * seq_len`` as a (B, 1) tensor, if the caller keeps one."""
        if offsets is None:
            offsets = row_offsets(idx.shape[0], seq_len, idx.device)
        return cls(idx, (idx + offsets).reshape(-1))


def row_offsets(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """(B, 1): where each row starts in the flattened (B*S, ...) view."""
    return (torch.arange(batch, device=device) * seq_len)[:, None]


def take(x: torch.Tensor, sel: Selection) -> torch.Tensor:
    """x[b, idx[b]] for x of shape (B|1, S, ...): one row gather (a batch of 1 is shared by every row)."""
    b, k = sel.idx.shape
    if x.shape[0] == 1:
        rows = x[0].index_select(0, sel.idx.reshape(-1))
    else:
        rows = x.reshape(-1, *x.shape[2:]).index_select(0, sel.flat)
    return rows.view(b, k, *x.shape[2:])


def put(full: torch.Tensor, sub: torch.Tensor, sel: Selection) -> torch.Tensor:
    """``full`` (B, S, ...) with its rows ``sel`` replaced by ``sub`` (B, K, ...): one row scatter, out of place."""
    rows = full.reshape(-1, *full.shape[2:])
    return rows.index_copy(0, sel.flat, sub.reshape(-1, *full.shape[2:]).to(full.dtype)).view(full.shape)


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
    """cu_seq_lens / max_length over the flattened (B, K) kept tokens, a segment starting at each position 0 (reads
    the boundaries back to the host; ``kept_varlen_kwargs`` does not)."""
    starts = (positions.reshape(-1) == 0).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def kept_varlen_kwargs(call: dict[str, Any], sel: Selection) -> dict[str, Any]:
    """The flash varlen arguments of the kept tokens, from the full rows' ones without a host sync: segment j of the
    kept tokens starts at the count of kept tokens before the full segment j (``searchsorted`` on the ascending
    ``flat``), so a fully dropped segment has length 0. ``max_length`` stays an upper bound: min(full, K)."""
    k = sel.idx.shape[1]
    out: dict[str, Any] = {}
    for side in ("q", "k"):
        cu = call.get(f"cu_seq_lens_{side}")
        if cu is not None:
            out[f"cu_seq_lens_{side}"] = torch.searchsorted(sel.flat, cu.to(sel.flat.dtype)).to(cu.dtype)
        longest = call.get(f"max_length_{side}")
        if longest is not None:
            out[f"max_length_{side}"] = min(longest, k) if isinstance(longest, int) else longest.clamp(max=k)
    return out


class ArgMap:
    """Reads and replaces a call's arguments by name, whether passed positionally or by keyword (also inside
    ``**kwargs``), from positions worked out once per layer: plain tuple/dict work, which ``torch.compile`` traces
    (``inspect.Signature.bind`` would break the graph)."""

    def __init__(self, sig: inspect.Signature):
        params = list(sig.parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.position = {p.name: i for i, p in enumerate(params) if p.kind in positional}
        self.named = {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}

    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self.position.get(name)
        return args[i] if i is not None and i < len(args) else None

    def replace(self, args: tuple, kwargs: dict, values: dict[str, Any]) -> tuple[tuple, dict]:
        """New (args, kwargs) with ``values`` set: a name goes where it was passed; one not passed is added as a
        keyword only if the signature names it (a name a ``**kwargs`` layer never got is left out)."""
        args, kwargs = list(args), dict(kwargs)
        for name, value in values.items():
            i = self.position.get(name)
            if i is not None and i < len(args):
                args[i] = value
            elif name in kwargs or name in self.named:
                kwargs[name] = value
        return tuple(args), kwargs


def subset_call(
    forward: Any, argmap: ArgMap, policy: DropPolicy, sel: Selection, args: tuple, kwargs: dict, flash: bool
) -> Any:
    """Run ``forward`` on the tokens ``sel`` and scatter its output back; others pass through unchanged. ``flash``:
    the attention kernel reads position ids (renumber them per kept segment)."""
    hidden = argmap.get(args, kwargs, policy.hidden)
    values: dict[str, Any] = {policy.hidden: take(hidden, sel)}
    mask = argmap.get(args, kwargs, policy.mask)
    padding = isinstance(mask, torch.Tensor) and mask.dim() == 2
    values[policy.mask] = take(mask, sel) if padding else gather_mask(mask, sel.idx)
    rope = argmap.get(args, kwargs, policy.rope) if policy.rope else None
    if rope is not None:
        values[policy.rope] = tuple(take(t, sel) for t in rope)
    positions = argmap.get(args, kwargs, policy.position_ids) if policy.position_ids else None
    varlen = kwargs.get("cu_seq_lens_q") is not None
    if positions is not None:
        flash = flash or varlen
        values[policy.position_ids] = segment_positions(positions, sel.idx) if flash else take(positions, sel)
    elif varlen:
        raise ValueError("token_dropping needs position_ids alongside cu_seq_lens (packed flash attention)")
    if varlen:  # flash varlen over packed rows: boundaries of the kept tokens
        values.update(kept_varlen_kwargs(kwargs, sel))
    args, kwargs = argmap.replace(args, kwargs, values)
    out = forward(*args, **kwargs)
    sub = out[0] if isinstance(out, tuple) else out
    full = put(hidden, sub, sel)
    return (full, *out[1:]) if isinstance(out, tuple) else full


def run_on_subset(
    forward: Any, sig: inspect.Signature, policy: DropPolicy, idx: torch.Tensor, args, kwargs, flash: bool = False
):
    """Run ``forward`` on the tokens ``idx`` (B, K) and scatter its output back; others pass through unchanged."""
    argmap = ArgMap(sig)
    sel = Selection.of(idx, argmap.get(args, kwargs, policy.hidden).shape[1])
    return subset_call(forward, argmap, policy, sel, args, kwargs, flash)
