"""Memory planner: predicted per-device training memory of a recipe (or of a bare parameter count), whether it fits a
GPU, and the cheapest change that makes it fit (``hf-efftrain plan``).

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", arXiv 1910.02054, Sec. 3.1 and 5): mixed-precision Adam keeps ``2 + 2 + K``
bytes per parameter (16-bit weights and gradients, ``K = 12`` of fp32 master weights, momentum and variance); ZeRO-1
(P_os) divides ``K`` by the data-parallel degree ``Nd``, ZeRO-2 (P_os+g) also the gradients, ZeRO-3 (P_os+g+p) also
the weights; FSDP full sharding is counted as ZeRO-3. That layout is what DeepSpeed runs. Without DeepSpeed the
Trainer's autocast keeps fp32 weights and gradients (``4 + 4 + 8``) and autocast keeps a 16-bit copy of each matmul
weight for the backward pass. Optimizer states: AdamW/Adam/LAMB two moments, Lion and SGD with momentum one,
8-bit bitsandbytes states ``1 + 4/256`` bytes per moment (block-wise absmax, Dettmers et al. 2022, arXiv
2110.02861). LoRA (Hu et al. 2021, arXiv 2106.09685) freezes the base, in 16-bit; QLoRA (Dettmers et al. 2023,
arXiv 2305.14314) stores the blocks' linear weights in 4-bit NF4 with double quantization, ``0.5 + 0.127/8`` bytes
per parameter; the adapters keep fp32 weights, gradients and optimizer states.

Activations come from ``plan_activations`` (Korthikanti et al. 2022, arXiv 2205.05198, adapted to HF layers).
The peak is not the sum of everything: the Trainer frees gradients after each optimizer step, so activations and
gradients only coexist with gradient accumulation or under ZeRO/FSDP, whose gradient buffers persist; the peak is
``persistent + max(forward/backward, optimizer step)``. Units: GB = 1e9 bytes (as in the ZeRO paper).
The table, ``--json`` and the command-line arguments live in ``plan_report.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .activations import activation_bytes, tensor_parallel_fraction
from .inputs import ModelSpec, Setup

GB = 1e9
NF4_BYTES = 0.5 + 0.127 / 8  # QLoRA Sec. 3: double quantization costs 0.127 bits per parameter
INT8_BYTES = 1.0
BNB8_STATE_BYTES = 1 + 4 / 256  # one uint8 per element + an fp32 absmax per block of 256
MOMENTS = {"adamw": 2, "adam": 2, "lamb": 2, "lion": 1, "sgd": 0, "sgd_momentum": 1, "adafactor": 0}
ALL = "all-linear"
ZERO_STAGE = {"single": 0, "ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}


def zero_model_state_bytes(params: float, nd: int, stage: int, k: float = 12, weight_bytes: float = 2,
                           grad_bytes: float = 2) -> dict[str, float]:  # fmt: skip
    """Per-device model states of the ZeRO paper (Sec. 5.1): ``(2 + 2 + K) * Psi``, with stage 1/2/3 dividing the
    optimizer states, then also the gradients, then also the weights by ``Nd``."""
    out = {"weights": weight_bytes * params, "gradients": grad_bytes * params, "optimizer states": k * params}
    for name, from_stage in (("optimizer states", 1), ("gradients", 2), ("weights", 3)):
        if stage >= from_stage:
            out[name] /= nd
    return out


@dataclass
class Estimate:
    setup: Setup
    device: dict[str, int]  # component -> bytes on each device
    host: dict[str, int]  # component -> bytes offloaded to CPU memory (per process)
    phases: dict[str, int]  # persistent / forward-backward / optimizer step
    peak: int
    trainable: int
    notes: list[str] = field(default_factory=list)

    def fits(self, budget: float | None) -> bool | None:
        return None if budget is None else self.peak <= budget


def estimate(model: ModelSpec, s: Setup) -> Estimate:
    """Predicted per-device memory of training ``model`` with set-up ``s``."""
    stage = ZERO_STAGE[s.strategy]
    nd = s.num_gpus if stage else 1
    deepspeed = s.strategy in ("zero1", "zero2", "zero3")
    mixed = s.precision != "fp32"
    c = 2 if mixed else 4  # compute bytes
    notes = list(s.notes)
    if s.adapter:
        trainable = model.lora_params(s.lora_rank, s.lora_targets)
        linear, rest = model.block_linear_params, model.params - model.block_linear_params
        base = {
            "lora": model.params * c,
            "qlora": linear * NF4_BYTES + rest * c,
            "int8": linear * INT8_BYTES + rest * c,
        }
        frozen, wb, gb, master, state_b = base[s.adapter], 4, 4, 0, 4  # PEFT keeps adapters in fp32
        residual = c
    else:
        trainable, frozen = model.params, 0
        if mixed and deepspeed and not s.pure_16bit:  # the ZeRO paper's layout: 16-bit model, fp32 master
            wb, gb, master, state_b = 2, 2, 4, 4
        elif s.pure_16bit:
            wb, gb, master, state_b = 2, 2, 0, 2
        else:  # fp32 weights; with bf16/fp16 the Trainer's autocast computes in 16-bit on the fly
            wb, gb, master, state_b = 4, 4, 0, 4
        residual = 4 if wb == 4 and s.strategy != "fsdp" else c  # FSDP mixed precision gathers 16-bit weights
    if s.optimizer_bits == 8:
        state_b = BNB8_STATE_BYTES
    k = master + MOMENTS[s.optimizer] * state_b
    states = zero_model_state_bytes(trainable, nd, stage, k=k, weight_bytes=wb, grad_bytes=gb)
    weights = states["weights"] + (frozen / nd if stage >= 3 else frozen)
    device: dict[str, float] = {"weights": weights, "gradients": states["gradients"]}
    device["optimizer states" + (" (incl. fp32 master)" if master else "")] = states["optimizer states"]
    host: dict[str, float] = {}
    if s.offload_optimizer:
        for name in list(device)[1:]:  # ZeRO-Offload: fp32 gradients and optimizer step live on the CPU
            host[name], device[name] = device[name], 0
    if s.offload_params and stage >= 3:
        host["weights"], device["weights"] = device["weights"], 0

    hidden = model.shape.hidden
    if not s.adapter and mixed and residual == 4:
        head = 0 if s.fused_loss == "chunked" else model.vocab * hidden  # the chunked loss computes the head in fp32
        device["16-bit weight copies (autocast)"] = (model.block_linear_params + head) * 2
    if s.strategy == "ddp" and s.num_gpus > 1:
        device["DDP gradient buckets"] = trainable * gb  # gradient_as_bucket_view=False: a second copy
    if stage >= 3:  # the block being computed and the prefetched next one, plus the LM head, gathered in 16-bit
        block = (model.params - model.head_params) / max(model.layers, 1)
        device["gathered params (ZeRO-3)"] = (2 * block + model.vocab * hidden) * c
    attention = s.attention
    if attention == "sdpa" and s.device == "cpu" and model.shape.attn_dropout:
        attention = "eager"  # CPU SDPA has no fused kernel with dropout: its math fallback keeps the scores
        notes.append("CPU SDPA with attention dropout runs the math fallback: scores are kept, as in eager")
    acts = activation_bytes(
        model.shape, model.layers, s.seq_len, s.batch, vocab=model.vocab, compute_bytes=c, residual_bytes=residual,
        attention=attention, checkpointing=s.checkpointing, checkpoint_every=s.checkpoint_every,
        mask_bytes=1 if s.device == "cuda" else c, loss_chunk=s.loss_chunk, head_trainable=not s.adapter,
    )  # fmt: skip
    device["activations (blocks)"] = acts["layers"]
    device["activations (LM head + loss)"] = acts["head"]
    if s.tp * s.pp > 1:  # Megatron-style model parallelism on top of the data parallelism above
        split = s.tp * s.pp  # every weight matrix split t ways, the layers p ways (norms and biases: negligible)
        for part in (device, host):
            for name in [n for n in part if not n.startswith("activations")]:
                part[name] /= split
        shape = model.shape
        acts["layers"] *= tensor_parallel_fraction(s.seq_len, hidden, shape.heads, s.tp, attention)
        device["activations (blocks)"] = acts["layers"]
        # 1F1B: the first stage holds p micro-batches of L/p layers in flight, i.e. L layers' worth (Sec. 4.2.3),
        # so pipelining divides no activations; the head's stay counted (on the last stage).
        notes.append(f"tensor parallel {s.tp} x pipeline {s.pp}: model states split {split} ways, block "
                     "activations per Korthikanti et al. (first pipeline stage, no sequence parallelism)")  # fmt: skip
    temp = 0.0
    if not s.offload_optimizer and s.optimizer_bits == 32 and MOMENTS[s.optimizer] and not deepspeed:
        # torch's foreach step (CUDA) allocates one state-sized temporary; the per-tensor CPU loop one tensor's worth
        temp = trainable * state_b if s.device == "cuda" else min(trainable, model.vocab * hidden) * state_b
        temp = (temp / nd if stage >= 1 else temp) / (s.tp * s.pp)
    device["optimizer step temporaries"] = temp

    grads = device["gradients"]
    grads_persist = s.grad_accum > 1 or stage >= 1
    head_grad = 0 if (s.adapter or grads_persist) else model.vocab * hidden * gb  # first gradient of the backward
    transient = {"activations (blocks)", "activations (LM head + loss)", "optimizer step temporaries", "gradients",
                 "16-bit weight copies (autocast)"}  # fmt: skip
    persistent = sum(v for n, v in device.items() if n not in transient) + (grads if grads_persist else 0)
    fwd = acts["layers"] + acts["head"] + head_grad + device.get("16-bit weight copies (autocast)", 0)
    step = (0 if grads_persist else grads) + temp
    phases = {"persistent": persistent, "forward/backward": persistent + fwd, "optimizer step": persistent + step}
    if s.adapter:
        notes.append(f"{s.adapter}: {trainable:,} trainable adapter parameters (rank {s.lora_rank})")
    return Estimate(
        setup=s,
        device={n: int(v) for n, v in device.items() if v},
        host={n: int(v) for n, v in host.items() if v},
        phases={n: int(v) for n, v in phases.items()},
        peak=int(max(phases["forward/backward"], phases["optimizer step"])),
        trainable=int(trainable),
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------- suggestions
def _candidates(model: ModelSpec, s: Setup) -> list[tuple[str, Any]]:
    """Changes in order of cost (speed or quality given up); each maps a Setup to a changed Setup or None."""
    multi = s.num_gpus > 1

    def zero(stage: int):
        return lambda x: x.changed(strategy=f"zero{stage}") if multi and ZERO_STAGE[x.strategy] < stage else None

    def offload(x: Setup) -> Setup | None:
        if x.offload_optimizer:
            return None
        return x.changed(strategy=x.strategy if ZERO_STAGE[x.strategy] >= 2 else "zero2", offload_optimizer=True)

    def offload_all(x: Setup) -> Setup | None:
        return None if x.offload_params else x.changed(strategy="zero3", offload_optimizer=True, offload_params=True)

    def fused(x: Setup) -> Setup | None:
        if x.fused_loss:
            return None
        from ..techniques.fused_kernels import default_chunk_size

        return x.changed(fused_loss="chunked", loss_chunk=default_chunk_size(model.vocab))

    return [
        ("fused_kernels (chunked linear + cross-entropy: no full logits)", fused),
        ("gradient checkpointing", lambda x: None if x.checkpointing else x.changed(checkpointing=True)),
        (
            "8-bit optimizer states (bitsandbytes)",
            lambda x: x.changed(optimizer_bits=8) if x.optimizer_bits == 32 and MOMENTS[x.optimizer] else None,
        ),
        ("ZeRO-1", zero(1)),
        ("ZeRO-2", zero(2)),
        ("ZeRO-3", zero(3)),
        ("CPU offload of the optimizer (ZeRO-Offload)", offload),
        ("ZeRO-3 with optimizer and parameters offloaded to CPU", offload_all),
        (
            "LoRA r=16 on all linear layers (frozen base)",
            lambda x: None if x.adapter else x.changed(adapter="lora", lora_rank=16, lora_targets=ALL),
        ),
        (
            "QLoRA (4-bit NF4 base, LoRA r=16 on all linear layers)",
            lambda x: None if x.adapter == "qlora" else x.changed(adapter="qlora", lora_rank=16, lora_targets=ALL),
        ),
    ]


def _smaller_batch(x: Setup) -> list[Setup]:
    out, b, a = [], x.batch, x.grad_accum
    while b > 1:
        b, a = b // 2, a * 2
        out.append(x.changed(batch=b, grad_accum=a))
    return out


def _more_gpus(x: Setup) -> list[Setup]:
    strategy = x.strategy if ZERO_STAGE[x.strategy] >= 3 else "zero3"
    return [
        x.changed(num_gpus=n, strategy=strategy) for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n > x.num_gpus
    ]


def _describe(before: Setup, after: Setup) -> str:
    if after.batch != before.batch:
        return f"micro-batch {after.batch} with {after.grad_accum} accumulation steps (same effective batch)"
    return f"{after.num_gpus} GPUs with {'FSDP' if after.strategy == 'fsdp' else 'ZeRO-3'}"


def cheapest_fit(model: ModelSpec, s: Setup, budget: float) -> dict[str, Any] | None:
    """The first change, in order of cost, whose predicted peak fits ``budget``; when no single change does, the
    changes are stacked in that order until one does. None when even 1024 GPUs with everything on do not fit."""
    families = [(label, lambda x, f=fn: [y] if (y := f(x)) else []) for label, fn in _candidates(model, s)]
    families += [("smaller micro-batch", _smaller_batch), ("more GPUs", _more_gpus)]
    for label, fn in families:  # one change at a time
        for changed in fn(s):
            e = estimate(model, changed)
            if e.peak <= budget:
                name = label if label not in ("smaller micro-batch", "more GPUs") else _describe(s, changed)
                return {"changes": [name], "peak_bytes": e.peak, "setup": asdict(changed)}
    current, applied = s, []
    for label, fn in families:  # stacked
        for changed in fn(current):
            applied_now = applied + [label if label not in ("smaller micro-batch", "more GPUs")
                                     else _describe(current, changed)]  # fmt: skip
            e = estimate(model, changed)
            if e.peak <= budget:
                return {"changes": applied_now, "peak_bytes": e.peak, "setup": asdict(changed)}
        options = fn(current)
        if options:
            current = options[-1]
            applied.append(label if label not in ("smaller micro-batch", "more GPUs") else _describe(s, current))
    return None
