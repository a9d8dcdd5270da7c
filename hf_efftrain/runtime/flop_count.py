"""Model FLOPs per token: the dense PaLM formula, and a count of the training compute a run actually did.

PaLM appendix B (Chowdhery et al. 2022, arXiv 2204.02311) counts ``6 N + 12 L d_attn s`` per token: a forward of
2 N, a backward of 4 N (input and weight gradients) and the attention score/value matmuls, for a fully trainable
dense model. The efficient-training techniques of the survey (Zhuang et al. 2023, arXiv 2302.01107) do less: a
frozen weight (LoRA's base, Hu et al. 2021, arXiv 2106.09685) needs no weight gradient, below the lowest trainable
parameter backward needs no input gradient, and layer / token dropping, stacking, freezing and selective backprop
skip part of the work for part of the run. ``count_flops`` counts, per token, from the model as trained:

    matmul forward       2 in out      every nn.Linear / transformers Conv1D (LoRA's A and B are such linears)
    matmul input grad    2 in out      when a trainable parameter runs before it (backward has to pass through it)
    matmul weight grad   2 in out      when its weight requires grad
    attention forward    4 d_attn s    per attention layer: Q K^T and A V, non-causal as in PaLM
    attention backward   8 d_attn s    when gradients pass through it (only the matmuls autograd needs: LoRA on q / v
                                       skips dK, a quarter)

Forward order is read from module registration order, with four refinements: the input projections of an
attention module (every matmul in it but the last unit, the output projection) all read the attention's input, so
each starts from the state at its entry (a LoRA-wrapped projection is one unit: its base, then A, then B); Llama's
gate and up projections read the same input too; a transformer block's own norms (direct children holding
parameters but no matmul) count as lying at the block's start (pre-LN: Llama registers its norms after its
projections); and the unused original inside PEFT's ``modules_to_save`` wrapper is skipped. Other parallel
branches read as sequential (an over-count of input gradients, in the lowest trainable block only). Summed over a
fully trainable model the parts are exactly the dense count; tests/unit/test_flop_count.py checks the count against
``torch.utils.flop_counter.FlopCounterMode`` on real steps. Not counted, as in PaLM's MFU: gradient-checkpointing
recomputation; nor embedding lookups, norms, softmax, the loss and the optimizer. A technique that changes the
work over the run scales its part with ``Technique.compute_fraction`` (a ``ComputeFraction``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

PARTS = ("matmul_forward", "matmul_input_grad", "matmul_weight_grad", "attention_forward", "attention_backward")
# Outermost modules whose class name ends so hold one attention each (LlamaAttention, GPT2Attention, BertAttention,
# T5LayerSelfAttention / T5LayerCrossAttention, BartAttention, ...).
_ATTENTION_CLASS = re.compile(r"Attention\d*$")
# PEFT's names inside a wrapped projection: base_layer, lora_A.<adapter>, lora_B.<adapter>, ...
_ADAPTER_SUFFIX = re.compile(r"\.(base_layer|lora_[A-Za-z_]+\.[^.]+)$")
# Parallel MLP projections (Llama's gate / up, Mixtral's w1 / w3): the same group number reads the same input.
_PARALLEL = {"gate_proj": 0, "up_proj": 0, "w1": 1, "w3": 1}
# An attention's input projections by name (Llama / Mistral / Qwen, BERT, T5), for which gradients its backward needs.
_ROLES = {
    r: re.compile(rf"^({r}|{r}_proj|{name}|w{r})$") for r, name in (("q", "query"), ("k", "key"), ("v", "value"))
}


# ------------------------------------------------------------------------------------------------------ dense


def _config_get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def attention_shape(config: Any) -> tuple[int, int]:
    """(attention layers, d_attn = heads x head_dim) from a HF config; (0, 0) when the config does not say."""
    if hasattr(config, "get_text_config"):  # multimodal configs nest the language model's config
        config = config.get_text_config()
    heads = _config_get(config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    hidden = _config_get(config, "hidden_size", "n_embd", "d_model")
    head_dim = _config_get(config, "head_dim", "d_kv")
    if heads is None or (head_dim is None and hidden is None):
        return 0, 0
    d_attn = int(heads) * int(head_dim if head_dim is not None else int(hidden) // int(heads))

    if getattr(config, "is_encoder_decoder", False):
        encoder = _config_get(config, "encoder_layers", "num_layers", "num_hidden_layers")
        decoder = _config_get(config, "decoder_layers", "num_decoder_layers") or encoder
        # Each decoder layer has self-attention and cross-attention over the encoder output.
        return int(encoder or 0) + 2 * int(decoder or 0), d_attn
    layers = _config_get(config, "num_hidden_layers", "n_layer", "num_layers")
    return int(layers or 0), d_attn


def _matmul_shape(module: nn.Module) -> int | None:
    """in x out of an nn.Linear / Conv1D (not weight.numel(): 4-bit weights are packed, ZeRO-3 shards empty)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return int(module.in_features) * int(module.out_features)
    if isinstance(module, Conv1D):
        return int(module.nx) * int(module.nf)
    return None


def matmul_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most matmul FLOPs run in without autocast: each weight's dtype, or a quantized layer's
    ``compute_dtype`` (bitsandbytes 4-bit), weighted by in x out. Pure bf16 and ``model.dtype: bfloat16`` runs
    compute in bf16, so their MFU is against the bf16 peak; integer weights with no compute dtype are not counted."""
    share: dict[torch.dtype, int] = {}
    for m in _unwrap(model).modules():
        n = _matmul_shape(m)
        weight = getattr(m, "weight", None)
        dtype = getattr(m, "compute_dtype", None) or getattr(weight, "dtype", None)
        if n is not None and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            share[dtype] = share.get(dtype, 0) + n
    return max(share, key=share.__getitem__) if share else torch.float32


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / DeepSpeed engines wrap the model


def dense_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """PaLM's ``6 * N + 12 * L * d_attn * seq_len``: every matmul weight (``nn.Linear`` and ``Conv1D``, the LM head
    included, embedding lookups excluded) trained in full, plus the non-causal attention of ``L`` layers.

    Encoder-decoder models count cross-attention as one more attention layer per decoder layer and use ``seq_len``
    for both sides; this is the usual approximation. Comparable with other tools' MFU, not with a run that froze,
    dropped or skipped work (``count_flops``)."""
    model = _unwrap(model)
    matmul = sum(n for m in model.modules() if (n := _matmul_shape(m)) is not None)
    config = getattr(model, "config", None)
    layers, d_attn = attention_shape(config) if config is not None else (0, 0)
    if layers == 0:
        logger.warning("Could not find attention layers in the model config; counting matmul weights only.")
    return 6 * matmul + 12 * layers * d_attn * int(seq_len)


# ---------------------------------------------------------------------------------------------- the hook's answer


@dataclass(frozen=True)
class Parts:
    """Multipliers of the counted parts: the share of each that the run did on average (1.0: as counted)."""

    forward: float = 1.0
    input_grad: float = 1.0
    weight_grad: float = 1.0
    attention_forward: float = 1.0
    attention_backward: float = 1.0

    @classmethod
    def uniform(cls, fraction: float) -> Parts:
        return cls(fraction, fraction, fraction, fraction, fraction)

    def of(self, part: str) -> float:
        return getattr(self, part.removeprefix("matmul_"))


@dataclass(frozen=True)
class ComputeFraction:
    """What ``Technique.compute_fraction`` returns: ``blocks`` maps a module (a transformer block) to the share of
    the work of every matmul and attention inside it that the run did; ``rest`` applies to all the others (the LM
    head, blocks not named); ``note`` says in a few words what was assumed."""

    note: str
    blocks: Mapping[nn.Module, Parts] = field(default_factory=dict)
    rest: Parts = Parts()


def uniform_blocks(blocks: Iterable[nn.Module], fraction: float, note: str) -> ComputeFraction:
    """Every one of ``blocks`` did ``fraction`` of its work (a share of steps: at most 1)."""
    fraction = min(1.0, float(fraction))
    return ComputeFraction(f"{note}: {fraction:.4g}", {b: Parts.uniform(fraction) for b in blocks})


# ---------------------------------------------------------------------------------------------------- counting


@dataclass
class FlopCount:
    """Per-token training FLOPs by part (``PARTS``), after and before the techniques' fractions."""

    parts: dict[str, float]
    before_techniques: dict[str, float]
    dense: int
    matmul_params_trainable: int
    matmul_params_frozen: int
    matmul_params_without_input_grad: int
    attention_layers: int
    d_attn: int
    seq_len: int
    techniques: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return round(sum(self.parts.values()))

    def as_dict(self) -> dict[str, Any]:
        """The ``flops_counted`` entry of run_report.json."""
        return {
            "total": self.total,
            **{k: round(v) for k, v in self.parts.items()},
            "before_techniques": {k: round(v) for k, v in self.before_techniques.items()},
            "dense_6N_12Lds": self.dense,
            "matmul_params_trainable": self.matmul_params_trainable,
            "matmul_params_frozen": self.matmul_params_frozen,
            "matmul_params_without_input_grad": self.matmul_params_without_input_grad,
            "attention_layers": self.attention_layers,
            "d_attn": self.d_attn,
            "seq_len": self.seq_len,
            "techniques": self.techniques,
            "rules": "per token: matmul forward 2*in*out; input grad 2*in*out where a trainable parameter runs "
            "before it; weight grad 2*in*out where its weight trains; attention 4*d_attn*seq_len forward, up to "
            "twice that backward where gradients pass (non-causal, as PaLM); then each technique's fraction",
            "used_by": "mfu and model_flops_per_token use total; mfu_dense and model_flops_per_token_dense use "
            "dense_6N_12Lds",
            "not_counted": "gradient-checkpointing recomputation, embedding lookups, norms, softmax, loss, optimizer",
            "notes": self.notes,
        }


def _trains(params: Iterable[torch.nn.Parameter]) -> bool:
    return any(p.requires_grad for p in params)


def _skipped(model: nn.Module) -> set[int]:
    """Modules that never run: the original inside PEFT's ``ModulesToSaveWrapper`` (its trainable copy runs)."""
    out: set[int] = set()
    for m in model.modules():
        original = getattr(m, "original_module", None)
        if type(m).__name__ == "ModulesToSaveWrapper" and isinstance(original, nn.Module):
            if getattr(m, "modules_to_save", None) and not getattr(m, "disable_adapters", False):
                out.update(id(x) for x in original.modules())
    return out


def _block_norms_train(model: nn.Module) -> set[int]:
    """Blocks (elements of a ModuleList holding matmuls) with a trainable norm: a direct child holding parameters but
    no matmul. Its parameters count as lying at the block's start (pre-LN; Llama registers norms after projections)."""
    out: set[int] = set()
    for lst in model.modules():
        if not isinstance(lst, nn.ModuleList):
            continue
        for block in lst:
            if not any(_matmul_shape(m) is not None for m in block.modules()):
                continue
            for child in block.children():
                if not any(_matmul_shape(m) is not None for m in child.modules()) and _trains(child.parameters()):
                    out.add(id(block))
    return out


def _attention_sites(model: nn.Module, skipped: set[int]) -> list[nn.Module]:
    sites: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside or id(m) in skipped or not _ATTENTION_CLASS.search(type(m).__name__):
            continue
        sites.append(m)
        inside.update(id(x) for x in m.modules())
    return sites


def _attention_backward(per_site: float, units: dict[str, bool], other: bool) -> float:
    """Backward of Q K^T and A V: four matmuls of ``per_site / 2`` each, dS = dO V^T (when Q or K needs a gradient),
    dV = A^T dO, dQ = dS K and dK = dS^T Q, each done only when autograd needs it. Projections not named q / k / v
    (GPT-2's fused c_attn) count all four as soon as any of them needs a gradient."""
    need = {"q": False, "k": False, "v": False}
    named = set()
    for unit, state in units.items():
        leaf = unit.rsplit(".", 1)[-1]
        role = next((r for r, pattern in _ROLES.items() if pattern.match(leaf)), None)
        if role is None:
            break
        named.add(role)
        need[role] = need[role] or state
    if other or named != set(need):
        return 2.0 * per_site if other or any(units.values()) else 0.0
    q, k, v = need["q"], need["k"], need["v"]
    return per_site / 2 * ((q or k) + v + q + k)


def _items(model: nn.Module, per_site: float, sites: list[nn.Module]) -> tuple[list, int, int, int]:
    """``[(module, {part: FLOPs per token})]`` in forward order, plus trainable / frozen / no-input-grad params."""
    skipped = _skipped(model)
    norms = _block_norms_train(model)
    names = {id(m): n for n, m in model.named_modules()}
    site_of: dict[int, nn.Module] = {id(x): s for s in sites for x in s.modules()}
    plan: dict[int, tuple[dict[int, str], str | None]] = {}  # site -> (unit of each matmul, the output unit)
    for s in sites:
        mats = [m for m in s.modules() if _matmul_shape(m) is not None and id(m) not in skipped]
        unit = {id(m): _ADAPTER_SUFFIX.sub("", names[id(m)]) for m in mats}
        plan[id(s)] = (unit, unit[id(mats[-1])] if mats else None)
    items: list[tuple[nn.Module, dict[str, float]]] = []
    counts = {"trainable": 0, "frozen": 0, "no_input": 0}
    seen = False  # a trainable parameter has run before this point: backward has to reach it
    current, inside = None, False  # the attention module being read, and whether still among its inputs
    entry, units, other = False, {}, False  # its entry state, each input projection's state, trainable norms
    parallel: dict[str, bool] = {}  # parallel MLP projections: each unit's state, and each pair's start state

    def record(m: nn.Module, n: int, state: bool) -> None:
        weight = getattr(m, "weight", None)
        trains = weight is not None and weight.requires_grad
        counts["trainable" if trains else "frozen"] += n
        counts["no_input"] += n * (not state)
        parts = {"matmul_forward": 2.0 * n, "matmul_input_grad": 2.0 * n * state}
        items.append((m, {**parts, "matmul_weight_grad": 2.0 * n * trains}))

    def close(s: nn.Module) -> bool:
        items.append((s, {"attention_forward": per_site, "attention_backward": _attention_backward(
            per_site, units, other)}))  # fmt: skip
        return entry or other or any(units.values())

    for m in model.modules():
        if id(m) in skipped:
            continue
        seen = seen or id(m) in norms
        s = site_of.get(id(m))
        if s is not None and s is not current:  # entering an attention module
            current, inside, entry, units, other = s, True, seen, {}, False
            if plan[id(s)][1] is None:
                seen, inside = close(s), False
        n = _matmul_shape(m)
        own = _trains(m.parameters(recurse=False))
        if s is not None and inside:
            unit_of, out_unit = plan[id(s)]
            if n is None:
                other = other or own
                continue
            if unit_of[id(m)] != out_unit:  # an input projection: reads the attention's input
                state = units.get(unit_of[id(m)], entry)
                units[unit_of[id(m)]] = state or own
                record(m, n, state)
                continue
            seen, inside = close(s), False  # the output projection: the attention ran just before it
        if n is not None:
            unit = _ADAPTER_SUFFIX.sub("", names[id(m)])
            parent, _, leaf = unit.rpartition(".")
            if leaf in _PARALLEL:  # gate / up: both read the MLP's input, each from the state at the first one
                state = parallel.get(unit, parallel.setdefault(f"{parent}#{_PARALLEL[leaf]}", seen))
                parallel[unit] = state or own
                record(m, n, state)
                seen = seen or parallel[unit]
                continue
            record(m, n, seen)
        seen = seen or own
    return items, counts["trainable"], counts["frozen"], counts["no_input"]


def _scale(items: list, fraction: ComputeFraction) -> list:
    owner: dict[int, Parts] = {}
    for block, parts in fraction.blocks.items():
        for x in block.modules():
            owner[id(x)] = parts
    return [(m, {k: v * owner.get(id(m), fraction.rest).of(k) for k, v in p.items()}) for m, p in items]


def _sum(items: list) -> dict[str, float]:
    total = dict.fromkeys(PARTS, 0.0)
    for _, parts in items:
        for k, v in parts.items():
            total[k] += v
    return total


def count_flops(model: nn.Module, seq_len: int, fractions: Sequence[tuple[str, ComputeFraction]] = ()) -> FlopCount:
    """Training FLOPs per token the run did (module docstring), each technique's ``(name, fraction)`` applied in
    turn; ``techniques[i]["fraction_of_total"]`` is how much technique i scaled the total left by those before it."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    layers, d_attn = attention_shape(config) if config is not None else (0, 0)
    per_site = 4.0 * d_attn * int(seq_len)
    skipped = _skipped(model)
    sites = _attention_sites(model, skipped)
    notes: list[str] = []
    if len(sites) != layers:
        if layers:
            notes.append(f"found {len(sites)} attention modules where the config says {layers}: attention counted "
                         "from the config, outside every block (techniques' per-block fractions skip it)")  # fmt: skip
        sites = []
    items, trainable, frozen, no_input = _items(model, per_site, sites)
    if not sites and layers:
        backward = 2 * per_site if _trains(model.parameters()) else 0.0
        items += [(model, {"attention_forward": per_site, "attention_backward": backward})] * layers
    before = _sum(items)
    techniques = []
    for name, fraction in fractions:
        scaled = _scale(items, fraction)
        ratio = sum(_sum(scaled).values()) / max(sum(_sum(items).values()), 1e-30)
        techniques.append({"name": name, "note": fraction.note, "fraction_of_total": round(ratio, 6)})
        items = scaled
    dense = dense_flops_per_token(model, seq_len)
    return FlopCount(_sum(items), before, dense, trainable, frozen, no_input, layers, d_attn, int(seq_len),
                     techniques, notes)  # fmt: skip


def model_flops_per_token(
    model: nn.Module, seq_len: int, fractions: Sequence[tuple[str, ComputeFraction]] = ()
) -> int:
    """Training FLOPs per token counted from the model as trained (``count_flops``): equal to
    ``dense_flops_per_token`` for a fully trainable model, less where weights are frozen or work was skipped."""
    return count_flops(model, seq_len, fractions).total
