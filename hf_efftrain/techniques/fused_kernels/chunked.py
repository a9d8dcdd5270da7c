"""Chunked linear + cross-entropy: the output head's logits a chunk of rows at a time, never ``[tokens, vocab]``.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009; the same idea as
Liger Kernel's FusedLinearCrossEntropy (Hsu et al. 2024, arXiv 2410.10989). For rows ``h_i`` of the final hidden
states, the head ``W`` ``[V, H]`` (bias ``b``) and targets ``y_i`` (``-100``: no loss)::

    z_i = W h_i + b                      loss_sum = sum_i (logsumexp(z_i) - z_{i, y_i})
    g_i = softmax(z_i) - onehot(y_i)     dh_i = W^T g_i      dW = sum_i g_i h_i^T      db = sum_i g_i

The forward pass takes the rows with a target, ``chunk_size`` at a time: it computes the chunk's logits (fp32,
autocast off), its loss and at once its gradient, adds ``dW`` into one fp32 ``[V, H]`` buffer, keeps ``dh`` and
frees the chunk. Backward only scales the stored gradients by the incoming one. Peak extra memory is one
``[chunk, V]`` fp32 buffer (plus ``[V, H]`` for ``dW``) instead of the several ``[N, V]`` tensors the stock head and
loss keep (the logits, their fp32 copy when the head runs in half precision, the log-softmax, the gradient). A
frozen head (LoRA) gets no ``dW``: that matmul and buffer are skipped; a head tied to the input embedding simply
receives both gradients.

``ChunkedCausalLMLoss(model)`` routes a causal LM's training loss through it, exactly as transformers'
``ForCausalLMLoss`` defines it: targets are ``labels`` shifted by one (or the batch's ``shift_labels``), the loss is
``sum / num_items_in_batch`` when the Trainer counts the items of the accumulated step, else the mean over the
targets. It patches the head instance's ``forward`` (undo handle): during a loss call the head computes the chunked
loss from the hidden states it is given and returns a zero-stride fp32 placeholder of logits' shape (no storage),
so the model runs through every wrapper (PEFT, DDP, autocast) as usual; at any other time (evaluation, generation)
the head is the original one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ...core.layers import unwrap_model
from ...core.patching import Patch, patch_attr, route_training_loss
from ..selective_backprop import loss_shifts_labels

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 24  # default chunk: 16M logits (64 MiB fp32) per chunk, e.g. 512 rows of a 32k vocabulary
# config fields whose model forward transforms the logits after the head (Gemma 2/3 softcapping, Cohere, Granite)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def default_chunk_size(vocab_size: int) -> int:
    return max(1, CHUNK_LOGITS // max(1, vocab_size))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of the token cross-entropies of ``hidden @ weight.T + bias`` (all targets valid); gradients in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, need_hidden, need_weight, need_bias):
        with torch.autocast(hidden.device.type, enabled=False):  # logits in fp32 whatever the ambient autocast
            w = weight.float()  # no copy for fp32 weights
            b = bias.float() if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_hidden else None
            grad_w = torch.zeros_like(w) if need_weight else None
            grad_b = torch.zeros_like(b) if need_bias else None
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].float()
                y = targets[start : start + chunk_size]
                z = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()  # [c, V], the only big buffer
                z_y = z.gather(1, y[:, None]).squeeze(1)
                m = z.amax(1, keepdim=True)
                z.sub_(m).exp_()  # in place: exp(z - max)
                s = z.sum(1, keepdim=True)
                total += (m.squeeze(1) + s.squeeze(1).log() - z_y).sum()
                if grad_h is None and grad_w is None and grad_b is None:
                    del z  # before the next chunk's buffer is made: one [c, V] at a time, not two
                    continue
                z.div_(s)  # softmax
                z.scatter_add_(1, y[:, None], z.new_full((len(y), 1), -1.0))  # softmax - onehot
                if grad_h is not None:
                    grad_h[start : start + chunk_size] = (z @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.addmm_(z.t(), h)
                if grad_b is not None:
                    grad_b += z.sum(0)
                del z
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        dh = (grad_h * scale.to(grad_h.dtype)) if grad_h is not None else None
        dw = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        db = (grad_b * scale).to(b_dtype) if grad_b is not None else None
        return dh, dw, db, None, None, None, None, None


@torch.compiler.disable  # under torch.compile: eager, as written (the labelled-row count would recompile every step)
def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, count)``: the summed cross-entropy of ``hidden [N, H] @ weight [V, H].T (+ bias)`` against
    ``targets [N]`` over the rows whose target is not ``ignore_index``, and the number of such rows.
    ``F.cross_entropy(logits, targets, reduction="mean")`` is ``loss_sum / count``; no ``[N, V]`` tensor is made."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"need hidden [N, H], weight [V, H], targets [N]; got {hidden.shape}, {weight.shape}, {targets.shape}"
        )
    targets = targets.to(hidden.device)
    keep = (targets != ignore_index).nonzero().squeeze(1)  # rows without a target cost nothing
    h, y = hidden.index_select(0, keep), targets.index_select(0, keep)
    count = keep.new_tensor(keep.numel())
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    grad = torch.is_grad_enabled()
    needs = [grad and t is not None and t.requires_grad for t in (h, weight, bias)]
    if any(needs):
        return _ChunkedLinearCrossEntropy.apply(h, weight, bias, y, chunk, *needs), count
    with torch.no_grad():
        return _ChunkedLinearCrossEntropy.apply(h, weight, bias, y, chunk, False, False, False), count


def head_problem(model: torch.nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for ``model``'s own training loss (None: it can)."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    name = type(inner).__name__
    if getattr(config, "is_encoder_decoder", False) or not loss_shifts_labels(inner):
        return f"{name} is not a causal LM (its loss is not transformers' next-token ForCausalLMLoss)"
    for key in LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value is None and key == "logit_scale":
            value = getattr(inner, key, None)
        if value is not None:
            return (
                f"{name} transforms its logits after the head ({key}={value}), which the chunked loss does not "
                "reproduce; use backend liger on CUDA (it handles softcapping) or drop fused_kernels"
            )
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return (
            f"{name}'s output head is a {type(head).__name__}, not a plain torch.nn.Linear (an adapter, a "
            "modules_to_save copy or a quantized layer on lm_head): keep lm_head out of peft target_modules / "
            "modules_to_save and of quantization"
        )
    if not head.weight.is_floating_point():
        return f"{name}'s output head weight is {head.weight.dtype}, not a floating-point tensor"
    return None


class ChunkedCausalLMLoss:
    """The training loss of a causal LM through ``chunked_linear_cross_entropy`` (see the module docstring).

    ``loss(model, batch, num_items_in_batch, trainer)`` runs ``model`` (the Trainer's wrapped model) without
    labels and returns the loss the stock ``Trainer.compute_loss`` would; ``install(trainer)`` wires it into a
    stock Trainer; ``undo()`` restores the head.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int | None = None):
        problem = head_problem(model)
        if problem:
            raise ValueError(problem)
        self.inner = unwrap_model(model)
        self.head = self.inner.get_output_embeddings()
        self.chunk_size = chunk_size or default_chunk_size(self.head.out_features)
        self.calls = 0
        self._targets: torch.Tensor | None = None  # the shifted labels of the loss call in progress
        self._result: tuple[torch.Tensor, torch.Tensor] | None = None
        self._placeholder: torch.Tensor | None = None
        self.patch = patch_attr(self.head, "forward", self._head_forward(self.head.forward))

    def _head_forward(self, original: Any):
        def forward(hidden: torch.Tensor) -> torch.Tensor:
            if self._targets is None:
                return original(hidden)
            targets, self._targets = self._targets, None  # one head call per loss call
            if targets.numel() != hidden[..., 0].numel():
                raise RuntimeError(
                    f"the head got hidden states {tuple(hidden.shape)} for targets {tuple(targets.shape)} "
                    "(logits_to_keep, or a model that changes the sequence length?)"
                )
            flat = hidden.reshape(-1, hidden.shape[-1])
            head = self.head
            self._result = chunked_linear_cross_entropy(
                flat, head.weight, head.bias, targets.reshape(-1), self.chunk_size
            )
            # fp32, so that an fp32-output wrapper (accelerate's mixed precision) does not copy it
            zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
            self._placeholder = zero.expand(*hidden.shape[:-1], head.out_features)
            return self._placeholder

        return forward

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
        trainer: Any = None,
    ) -> torch.Tensor | None:
        """The stock training loss of ``batch`` (None without labels: the caller's default path)."""
        labels, shift_labels = batch.get("labels"), batch.get("shift_labels")
        if shift_labels is None and not torch.is_tensor(labels):
            return None
        if trainer is not None and (trainer.compute_loss_func is not None or trainer.label_smoother is not None):
            return None  # a custom loss over the full logits: the Trainer's own path
        if shift_labels is None:  # ForCausalLMLoss: pad with ignore_index, then tokens < n predict n
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
        self._targets, self._result, self._placeholder = shift_labels, None, None
        try:
            outputs = model(**inputs)
        finally:
            self._targets = None
        result, placeholder, self._placeholder = self._result, self._placeholder, None
        self._result = None
        if result is None:
            raise RuntimeError(f"{type(self.inner).__name__} never called its output head: no loss was computed")
        logits = outputs.get("logits") if isinstance(outputs, dict) else outputs[0]
        if logits is not placeholder:
            raise RuntimeError(
                f"{type(self.inner).__name__}.forward transformed the logits after the head; the chunked loss "
                "would differ from the model's own (remove fused_kernels for this model)"
            )
        total, count = result
        self.calls += 1
        accepts = trainer is None or trainer.model_accepts_loss_kwargs
        if num_items_in_batch is not None and accepts:
            loss = total / (
                num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            )
        else:
            loss = total / count
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if aux is not None:  # MoE load balancing (Mixtral and kin add it only when given labels)
            coef = getattr(self.inner, "router_aux_loss_coef", None)
            if coef is None:
                raise RuntimeError(f"{type(self.inner).__name__} returned an aux_loss but has no router_aux_loss_coef")
            loss = loss + coef * aux.to(loss.device)
        if (
            trainer is not None
            and trainer.args.average_tokens_across_devices
            and num_items_in_batch is not None
            and accepts
        ):
            # as Trainer.compute_loss: the count covers every process, DDP averages the gradients
            scale = trainer.accelerator.num_processes // trainer.get_tp_size()
            loss = loss * (scale if trainer.args.n_gpu <= 1 else trainer.args.n_gpu)
        return loss

    def install(self, trainer: Any) -> Patch:
        """Route a stock ``transformers.Trainer``'s training loss through ``loss``; returns the undo handle."""
        return route_training_loss(trainer, lambda model, inputs, _, n: self.loss(model, inputs, n, trainer))

    def undo(self) -> None:
        self.patch.undo()
