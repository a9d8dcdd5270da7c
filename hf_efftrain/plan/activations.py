"""Activation memory of a transformer training step: what autograd keeps between the forward and the backward pass.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198, Sec. 4.1)
count the bytes one GPT layer saves in 16-bit without recomputation as ``s*b*h*(34 + 5*a*s/h)``: attention
``11*s*b*h + 5*a*s^2*b`` (QKV input 2, Q and K 4, V 2, output-projection input 2, dropout mask 1; softmax output 2,
its dropout mask 1 and dropout output 2 per score), MLP ``19*s*b*h`` (input 2, GeLU input 8, GeLU output 8, mask 1)
and two LayerNorm inputs ``4*s*b*h``; with full recomputation only each layer's input, ``2*s*b*h``, stays.

``layer_bytes`` keeps that tensor-by-tensor inventory but takes the sizes and byte widths as parameters, so one
function covers the paper's Megatron layer (``LayerShape.paper_gpt``) and Hugging Face layers as they really run:

- fp32 compute (CPU) stores every saved tensor in 4 bytes; autocast (bf16/fp16 with fp32 weights) gives each
  linear layer its own 16-bit copy of its input, while the residual stream and norms stay fp32;
- HF's Llama-style RMSNorm is written in Python and keeps its fp32 input and normalised output (``rms``), where a
  fused LayerNorm keeps only its input (``fused``);
- gated MLPs (SwiGLU) keep four intermediate-sized tensors; ``gelu_new`` (GPT-2's Python GeLU) keeps four for the
  activation alone;
- SDPA/flash attention keep Q, K, V (K/V at their grouped-query size), the output and a log-sum-exp per row, never
  the ``a*s*s`` score matrix; eager attention keeps the fp32 softmax output (HF upcasts it), and repeats K/V to all
  heads first.

``tests/unit/test_plan.py`` checks the paper formula exactly and the HF inventory against the tensors autograd
actually saves (``torch.autograd.graph.saved_tensors_hooks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Attention = Literal["eager", "sdpa", "flash"]
Norm = Literal["fused", "rms"]


@dataclass(frozen=True)
class LayerShape:
    """One transformer block, as far as activation memory is concerned."""

    hidden: int
    heads: int
    intermediate: int
    kv_heads: int | None = None  # grouped-query attention; None = heads
    head_dim: int | None = None  # None = hidden // heads
    gated_mlp: bool = True  # SwiGLU-style gate * up (Llama, Mistral, Qwen) vs a plain activation (GPT-2, BERT)
    act_saved: int = 1  # intermediate-sized tensors the activation function itself keeps (gelu_new: 4)
    norm: Norm = "rms"
    fused_qkv: bool = False  # one QKV projection (GPT-2 c_attn) instead of three
    attn_dropout: bool = False  # dropout on the attention probabilities
    hidden_dropout: bool = False  # dropout after the attention and MLP blocks
    softmax_fp32: bool = True  # HF eager attention computes the softmax in fp32

    @classmethod
    def paper_gpt(cls, hidden: int, heads: int) -> LayerShape:
        """The layer of Korthikanti et al.: MLP 4h with GeLU, fused LayerNorm, dropout, 16-bit softmax."""
        return cls(
            hidden=hidden,
            heads=heads,
            intermediate=4 * hidden,
            gated_mlp=False,
            norm="fused",
            fused_qkv=True,
            attn_dropout=True,
            hidden_dropout=True,
            softmax_fp32=False,
        )

    @property
    def attn_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_width(self) -> int:
        return (self.kv_heads or self.heads) * (self.head_dim or self.hidden // self.heads)


def korthikanti_layer_bytes(seq: int, batch: int, hidden: int, heads: int) -> float:
    """The paper's closed form, 16-bit, no recomputation: ``s*b*h*(34 + 5*a*s/h)`` bytes per layer."""
    return seq * batch * hidden * (34 + 5 * heads * seq / hidden)


def tensor_parallel_fraction(seq: int, hidden: int, heads: int, tp: int, attention: Attention) -> float:
    """Share of a layer's activations one tensor-parallel rank keeps (Korthikanti et al. Sec. 4.2.1, no sequence
    parallelism): ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` of ``s*b*h*(34 + 5*a*s/h)``. The 10 (the layer norms' inputs
    and the residual dropouts) are replicated on every rank; attention and MLP internals are split. Flash/SDPA keep
    no score matrix, so its ``5*a*s/h`` term drops out."""
    scores = 5 * heads * seq / hidden if attention == "eager" else 0.0
    return (10 + (24 + scores) / tp) / (34 + scores)


def layer_bytes(
    shape: LayerShape,
    seq: int,
    batch: int,
    *,
    compute_bytes: int = 2,
    residual_bytes: int | None = None,
    attention: Attention = "sdpa",
    mask_bytes: int = 1,
    small_buffers: bool = True,
) -> int:
    """Bytes one block keeps for its backward pass.

    ``compute_bytes``: width of matmul inputs/outputs (4 fp32, 2 bf16/fp16). ``residual_bytes``: width of the
    residual stream and the weights (default ``compute_bytes``); 4 with 2-byte compute is autocast over fp32 weights.
    ``mask_bytes``: a dropout mask element (CUDA keeps bool masks; the CPU kernel keeps a float mask, so there it is
    ``compute_bytes``). ``small_buffers``: count the per-token norm statistics the paper ignores (mean/rstd).
    """
    c = compute_bytes
    w = residual_bytes or compute_bytes
    autocast = c < w
    h, i_size = shape.hidden, shape.intermediate
    per_token = 0.0

    # Two norms (before attention and before the MLP), each followed by the linear layer(s) that read it.
    for consumers in (1 if shape.fused_qkv else 3, 2 if shape.gated_mlp else 1):
        if shape.norm == "rms":  # fp32 upcast input + normalised output (kept by weight * x, in the weight's dtype)
            per_token += 4 * h + w * h + (4 if small_buffers else 0)  # + fp32 rsqrt per token
        else:  # a fused LayerNorm keeps its input
            per_token += w * h + (8 if small_buffers else 0)  # + fp32 mean and rstd per token
        # Without autocast the norm's output is one tensor shared by its readers; under autocast every linear
        # layer casts (and keeps) its own 16-bit copy.
        per_token += (consumers if autocast else 1) * c * h

    # Attention: Q, K, V as the kernel sees them; eager repeats grouped K/V to every head.
    kv = shape.kv_width if attention != "eager" else shape.attn_width
    per_token += c * (shape.attn_width + 2 * kv)
    per_token += c * shape.attn_width  # the output projection's input (for SDPA/flash also the kernel's output)
    if attention == "eager":
        scores = shape.heads * seq  # per token: one row of a*s scores
        softmax = 4 if shape.softmax_fp32 else c
        per_token += softmax * scores
        if shape.attn_dropout:
            per_token += (mask_bytes + c) * scores  # mask + dropout output (the input of probs @ V)
        elif softmax != c:
            per_token += c * scores  # the 16-bit copy of the fp32 softmax that probs @ V keeps
    else:
        per_token += 4 * shape.heads  # fp32 log-sum-exp per row
    if shape.hidden_dropout:
        per_token += 2 * mask_bytes * h  # one mask after attention, one after the MLP

    # MLP: the activation's own saved tensors, the down projection's input, and for gated MLPs the two
    # operands of gate * up.
    per_token += c * i_size * (shape.act_saved + 1 + (2 if shape.gated_mlp else 0))
    return int(per_token * seq * batch)


def head_bytes(
    hidden: int,
    vocab: int,
    seq: int,
    batch: int,
    *,
    compute_bytes: int,
    residual_bytes: int,
    norm: Norm = "rms",
    loss_chunk: int | None = None,
    head_trainable: bool = True,
) -> int:
    """Peak bytes of the final norm, the LM head and the cross-entropy loss at the start of the backward pass.

    HF computes the loss in fp32: log-softmax keeps its fp32 output, and the backward pass then holds that, the
    incoming gradient and the logits' gradient at once (three ``s*b*V`` fp32 tensors).

    ``loss_chunk`` (fused_kernels: a chunked linear + cross-entropy that computes its gradients in the forward pass,
    Wijmans et al. 2024, arXiv 2411.09009): one fp32 ``[chunk, V]`` logits buffer with its fp32 ``[chunk, h]`` input
    and output rows, the stored ``dL/dh`` (``s*b*h`` in the hidden states' dtype) and, for a trainable head, an fp32
    ``dL/dW`` (``V*h``); backward scales ``dL/dh`` into a second ``s*b*h``.
    """
    c, w = compute_bytes, residual_bytes
    tokens = seq * batch
    norm_per_token = (4 * hidden + w * hidden if norm == "rms" else w * hidden) + c * hidden
    if loss_chunk is None:
        return int((norm_per_token + 3 * 4 * vocab) * tokens)
    grad_h = w * hidden * tokens
    forward = 4 * min(loss_chunk, tokens) * (vocab + 2 * hidden) + grad_h
    return int(norm_per_token * tokens + max(forward, 2 * grad_h) + (4 * vocab * hidden if head_trainable else 0))


def activation_bytes(
    shape: LayerShape,
    layers: int,
    seq: int,
    batch: int,
    *,
    vocab: int,
    compute_bytes: int,
    residual_bytes: int,
    attention: Attention,
    checkpointing: bool = False,
    checkpoint_every: int = 1,
    mask_bytes: int = 1,
    loss_chunk: int | None = None,
    head_trainable: bool = True,
) -> dict[str, int]:
    """``{"layers": ..., "head": ...}``: peak activation bytes of the blocks and of the LM head + loss.

    With gradient checkpointing (HF's per-block, non-reentrant) a checkpointed block keeps only its input
    (``residual_bytes * s * b * h``, the paper's ``2*s*b*h`` in 16-bit); during the backward pass one block at a
    time is recomputed, so one block's full activations come on top.
    """
    one = layer_bytes(
        shape, seq, batch, compute_bytes=compute_bytes, residual_bytes=residual_bytes, attention=attention,
        mask_bytes=mask_bytes,
    )  # fmt: skip
    head = head_bytes(
        shape.hidden, vocab, seq, batch, compute_bytes=compute_bytes, residual_bytes=residual_bytes, norm=shape.norm,
        loss_chunk=loss_chunk, head_trainable=head_trainable,
    )  # fmt: skip
    if not checkpointing:
        return {"layers": layers * one, "head": head}
    checkpointed = layers // max(checkpoint_every, 1)
    inputs = residual_bytes * seq * batch * shape.hidden
    kept = checkpointed * inputs + (layers - checkpointed) * one
    # The head's loss tensors are freed before the first block is recomputed: the two peaks do not add up.
    return {"layers": kept + (one if checkpointed else 0), "head": max(head - one, 0) if checkpointed else head}
