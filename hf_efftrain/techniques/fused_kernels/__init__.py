"""Fused kernels: a training loss that never materialises the ``[tokens, vocab]`` logits, plus Liger's kernels on CUDA.

Survey (Zhuang et al. 2023, arXiv 2302.01107), "Hardware/algorithm co-design": memory-bound operators fused into
single kernels. At a large vocabulary the biggest activation of a causal LM is the logits and their fp32 copies
(``tokens x vocab x 4`` bytes each: 1 GiB for 8k tokens at 32k). Two backends:

- ``torch`` (any device): ``chunked.py``, the chunked linear + cross-entropy of Wijmans et al. 2024, "Cut Your
  Losses in Large-Vocabulary Language Models", arXiv 2411.09009, with gradients computed in the forward pass, so
  only one ``[chunk, vocab]`` buffer exists at a time. Same loss and gradients as the stock Trainer (fp32).
- ``liger`` (CUDA, extra ``liger``): Hsu et al. 2024, "Liger Kernel", arXiv 2410.10989: Triton RoPE, RMSNorm,
  SwiGLU and the fused linear cross-entropy, applied by the Trainer itself (``use_liger_kernel`` and
  ``liger_kernel_config``, set here; ``liger.py``). Without ``fused_linear_cross_entropy`` in ``kernels`` the loss
  is the torch one.

``auto`` picks liger with CUDA, the package and a model type it patches, else torch. The loss hook replaces only the
training loss; evaluation (and ``compute_metrics``' token accuracy, generation samples) runs the model's own forward.

Refused: tasks other than causal_lm / sft (the loss is next-token cross-entropy), label smoothing, and techniques
that read the model's full logits in training: ``selective_backprop`` (a no-grad forward that scores examples) and
``token_dropping`` with ``strategy: importance`` (a forward hook on the logits). ``data_pruning`` with ``score: el2n``
works: its proxies are separate models trained by its own loop before this run's model exists (they keep full logits
there). The torch backend also refuses FSDP and DeepSpeed ZeRO-3 (untested with a sharded head weight).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from transformers import TrainingArguments

from ...core.layers import unwrap_model
from ...core.registry import register_technique
from ...core.technique import ORDER_WRAPPER, Env, Technique, TechniqueConfig
from ...errors import MissingDependencyError, RecipeError
from . import liger
from .chunked import (  # noqa: F401  (re-exported: the functional core is imported from the package)
    ChunkedCausalLMLoss,
    chunked_linear_cross_entropy,
    default_chunk_size,
    head_problem,
)

logger = logging.getLogger(__name__)

TASKS = ("auto", "causal_lm", "sft")
Kernel = Literal["rope", "rms_norm", "swiglu", "geglu", "layer_norm", "fused_linear_cross_entropy"]


def full_logits_user(entry: Any) -> tuple[str, str] | None:
    """``(field, why)`` when a recipe's technique entry reads the model's full logits in training."""
    if entry.name == "selective_backprop":
        return "name", "it scores every example with a no-grad forward over the full logits before each loss"
    if entry.name == "token_dropping" and getattr(entry, "strategy", None) == "importance":
        return "strategy", "importance scoring reads the model's logits output (a forward hook) at every step"
    return None


class FusedKernelsConfig(TechniqueConfig):
    name: Literal["fused_kernels"] = "fused_kernels"
    backend: Literal["auto", "liger", "torch"] = Field(
        "auto",
        description="auto: liger on CUDA with liger-kernel installed and a model type it patches, else torch; "
        "liger: Liger's Triton kernels (CUDA, extra liger); torch: the chunked cross-entropy (any device).",
    )
    kernels: tuple[Kernel, ...] | None = Field(
        None,
        description="liger only: the kernels to apply (rope, rms_norm, swiglu, geglu, layer_norm, "
        "fused_linear_cross_entropy); default all. Without fused_linear_cross_entropy the loss is the torch one.",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="torch: target tokens per chunk; default 16M // vocab_size (a 64 MiB fp32 logits chunk).",
    )

    @field_validator("kernels")
    @classmethod
    def _kernels(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("give each kernel once, at least one (or omit kernels for all)")
        return value


@register_technique
class FusedKernelsTechnique(Technique):
    """Sets the Trainer's Liger arguments (liger) or patches the output head and replaces the training loss (torch)."""

    name = "fused_kernels"
    Config = FusedKernelsConfig
    survey_section = "Hardware/algorithm co-design / Fused kernels"
    paper = (
        'Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009; '
        'Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", arXiv 2410.10989'
    )
    order = ORDER_WRAPPER  # sees the head PEFT and quantization leave

    config: FusedKernelsConfig

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.path = ""  # "techniques[i]", for errors raised after validate
        self.use_liger = False  # Liger's kernels through TrainingArguments
        self.core: ChunkedCausalLMLoss | None = None
        self.trainer: Any = None
        self.args: TrainingArguments | None = None
        self.model: torch.nn.Module | None = None
        self.fallback: str | None = None  # why auto did not use liger
        self.sharded: str | None = None  # FSDP / ZeRO-3: the head weight is sharded

    @classmethod
    def status(cls) -> str:
        if torch.cuda.is_available() and liger.liger_available():
            return "ready"
        return (
            "ready (chunked cross-entropy; Liger kernels need CUDA and liger-kernel: pip install 'hf_efftrain[liger]')"
        )

    @property
    def kernels(self) -> tuple[str, ...]:
        return self.config.kernels if self.config.kernels is not None else liger.KERNELS

    @property
    def liger_loss(self) -> bool:
        return self.use_liger and "fused_linear_cross_entropy" in self.kernels

    def _error(self, field: str, message: str) -> RecipeError:
        return RecipeError(".".join(p for p in (self.path, field) if p), message)

    # ---- build time ---------------------------------------------------------------------------------------
    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        self.path = next((f"techniques[{i}]" for i, t in enumerate(recipe.techniques) if t is c), "")
        if recipe.model.task not in TASKS:
            raise RecipeError(
                "", f"model.task is {recipe.model.task}: fused_kernels replaces the next-token loss of causal_lm / sft"
            )
        for i, entry in enumerate(recipe.techniques):
            found = full_logits_user(entry)
            if found:
                field, why = found
                raise RecipeError(
                    "",
                    f"cannot be combined with techniques[{i}].{field} ({entry.name}): {why}, which fused_kernels "
                    "never materialises",
                )
        training = recipe.training
        if (training.get("label_smoothing_factor") or 0) > 0:
            raise RecipeError("", "training.label_smoothing_factor: the label smoother needs the full logits; use 0")
        for key in ("use_liger_kernel", "liger_kernel_config"):
            if key in training:
                raise RecipeError("", f"training.{key} is set by fused_kernels (backend, kernels); remove it")
        if c.backend == "torch" and c.kernels is not None:
            raise RecipeError("kernels", "Liger kernels are for backend liger (or auto on CUDA); remove kernels")
        has_liger = "liger_kernel" in env.installed or liger.liger_available()
        if c.backend == "liger":
            if not env.cuda:
                raise RecipeError("backend", "liger's Triton kernels need a CUDA GPU; use backend torch (or auto)")
            if not has_liger:
                raise MissingDependencyError("backend", "liger-kernel", "liger")
        self.use_liger = c.backend == "liger" or (c.backend == "auto" and env.cuda and has_liger)
        if c.backend == "auto" and not self.use_liger:
            self.fallback = "no CUDA" if not env.cuda else "liger-kernel not installed"
        zero3 = ((env.deepspeed_config or {}).get("zero_optimization") or {}).get("stage") == 3
        if env.distributed_type == "FSDP" or (env.distributed_type == "DEEPSPEED" and zero3):
            self.sharded = "FSDP" if env.distributed_type == "FSDP" else "DeepSpeed ZeRO-3"
        if self._sharded_problem():
            raise RecipeError("backend", self._sharded_problem())

    def _sharded_problem(self) -> str | None:
        if self.sharded and not self.liger_loss:
            return (
                f"the chunked loss reads the output head's weight whole, untested under {self.sharded} sharding; "
                "use backend liger, or DDP / ZeRO-2"
            )
        return None

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        self.args = args
        if self.use_liger:
            args.use_liger_kernel = True
            args.liger_kernel_config = liger.kernel_config(self.kernels)
        return args

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
        if self.use_liger:
            supported = liger.supported_model_types()
            if model_type not in supported:
                if self.config.backend == "liger":
                    raise self._error(
                        "backend",
                        f"liger-kernel has no kernels for model type {model_type!r}; supported: "
                        f"{', '.join(supported)} (or use backend torch)",
                    )
                self.use_liger, self.fallback = False, f"liger-kernel has no kernels for model type {model_type!r}"
                if self.args is not None:  # the same TrainingArguments object the trainer is built with
                    self.args.use_liger_kernel, self.args.liger_kernel_config = False, None
        if self.fallback:
            logger.info("fused_kernels: chunked cross-entropy (%s)", self.fallback)
        if not self.liger_loss:
            if self._sharded_problem():  # auto fell back from liger
                raise self._error("backend", self._sharded_problem())
            problem = head_problem(model)
            if problem:
                raise self._error("", problem)
            self.core = ChunkedCausalLMLoss(model, self.config.chunk_size)
        return model

    # ---- run time -----------------------------------------------------------------------------------------
    def on_trainer(self, trainer: Any) -> None:
        self.trainer = trainer

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], compute_loss: Any) -> torch.Tensor | None:
        if self.core is None:
            return None  # liger's fused loss is the model's own forward now: the default path
        # EffTrainer passes the Trainer's count of the accumulated step inside a functools.partial
        num_items = getattr(compute_loss, "keywords", {}).get("num_items_in_batch")
        return self.core.loss(model, batch, num_items, self.trainer)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "liger" if self.use_liger else "torch"}
        if self.fallback:
            out["fallback_reason"] = self.fallback
        if self.use_liger:
            out["liger_kernels"] = list(self.kernels)
            if self.model is not None:
                out["liger_fused_loss_active"] = liger.liger_forward_active(unwrap_model(self.model))
        if self.core is not None:
            vocab = self.core.head.out_features
            out.update(
                loss="chunked",
                chunk_size=self.core.chunk_size,
                vocab_size=vocab,
                loss_calls=self.core.calls,
                chunk_logits_bytes=4 * self.core.chunk_size * vocab,
            )
        return out


__all__ = [
    "ChunkedCausalLMLoss",
    "FusedKernelsConfig",
    "FusedKernelsTechnique",
    "chunked_linear_cross_entropy",
    "full_logits_user",
]


def planned_loss(
    entry: dict[str, Any], model_type: str | None, cuda: bool, tokens: int, vocab: int, hidden: int
) -> tuple[Literal["chunked", "liger"], int]:
    """For ``hf-efftrain plan``: which loss a recipe's entry runs (``backend: auto`` resolved as ``validate`` and
    ``on_model`` resolve it) and its rows per ``[chunk, vocab]`` logits chunk."""
    technique = FusedKernelsTechnique(FusedKernelsConfig(**entry))
    backend = technique.config.backend
    usable = cuda and liger.liger_available() and model_type in liger.supported_model_types()
    technique.use_liger = backend == "liger" or (backend == "auto" and usable)
    if technique.liger_loss:
        return "liger", liger.loss_chunk(tokens, vocab, hidden)
    return "chunked", technique.config.chunk_size or default_chunk_size(vocab)
