"""Quantized frozen base weights: 8-bit LLM.int8() or 4-bit NF4 with double quantization (QLoRA), under adapters.

Survey (Zhuang et al. 2023, arXiv 2302.01107), "Memory efficiency / Quantized training". The frozen base of a
parameter-efficient fine-tune is stored in low precision and dequantized on the fly; only the adapters (``peft``,
required) keep full-precision weights, gradients and optimizer state.

- ``bits: 8`` -- LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339): bitsandbytes ``Linear8bitLt`` keeps int8
  weights with one absmax scale per output row; input feature columns with an outlier above ``int8_threshold``
  (the paper's alpha = 6) are multiplied in 16 bit, the rest as int8 x int8 (vector-wise quantization).
- ``bits: 4`` -- QLoRA (Dettmers et al. 2023, arXiv 2305.14314): ``Linear4bit`` with the 4-bit NormalFloat data
  type (quantiles of N(0, 1), one absmax per 64 weights), double quantization (the absmax constants themselves
  quantized to 8 bit in blocks of 256), compute in ``compute_dtype``; and paged 8-bit AdamW for the adapters on
  CUDA (``training.optim: paged_adamw_8bit``) to survive memory spikes.

The quantization is transformers' own: a ``BitsAndBytesConfig`` passed as ``quantization_config`` to
``from_pretrained``. Built-in models are created with ``from_config``, which does not quantize, so such a model
is saved to a temporary folder and reloaded through the same ``from_pretrained`` path (``quantize_model``): one
code path for both. Then ``peft.prepare_model_for_kbit_training`` (fp32 norms/embeddings, frozen base), as PEFT
recommends; combine with ``gradient_checkpointing`` for activation memory. Functional core:
``bnb_config(bits=4)``, ``quantize_model(model, config)``, ``weight_memory(model)``.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ..core.registry import register_technique
from ..core.technique import ORDER_ADAPTER, Env, Technique, TechniqueConfig, has_package
from ..errors import MissingDependencyError, RecipeError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FOUR_BIT_FIELDS = ("quant_type", "double_quant", "compute_dtype")
EIGHT_BIT_FIELDS = ("int8_threshold",)
PAGED_OPTIM = "paged_adamw_8bit"


# ---- functional core ---------------------------------------------------------------------------------------
def bnb_config(
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.float32,
    int8_threshold: float = 6.0,
    skip_modules: list[str] | None = None,
):
    """transformers' ``BitsAndBytesConfig`` for 8-bit LLM.int8() or 4-bit (NF4 + double quantization) weights."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=int8_threshold, llm_int8_skip_modules=skip_modules
        )
    if bits == 4:
        dtype = DTYPES[compute_dtype] if isinstance(compute_dtype, str) else compute_dtype
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip_modules,
        )
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def device_map() -> dict[str, Any] | None:
    """bitsandbytes models are not moved by the Trainer: on CUDA, load each process's copy on its own GPU."""
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def quantize_model(model: torch.nn.Module, quantization_config: Any) -> torch.nn.Module:
    """A transformers model with its Linear layers quantized as ``quantization_config`` says.

    A model that is already quantized is returned as is. Otherwise it is saved (``save_pretrained``) to a
    temporary folder and loaded back with ``from_pretrained(quantization_config=...)``: the exact path a hub or
    local model takes, so built-in (``from_config``) and pretrained models end up the same.
    """
    if is_quantized(model):
        return model
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    kwargs: dict[str, Any] = {"quantization_config": quantization_config}
    if len(dtypes) == 1:
        kwargs["dtype"] = dtypes.pop()
    attn = getattr(model.config, "_attn_implementation", None)
    if attn:
        kwargs["attn_implementation"] = attn
    if (dm := device_map()) is not None:
        kwargs["device_map"] = dm
    with tempfile.TemporaryDirectory(prefix="hf_efftrain_quant_") as folder:
        model.save_pretrained(folder)
        quantized = type(model).from_pretrained(folder, **kwargs)
    quantized.train(model.training)
    # Keep the original name (adapter configs record it), not the deleted temporary folder.
    quantized.config.name_or_path = quantized.name_or_path = model.config.name_or_path
    return quantized


def quantized_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    import bitsandbytes as bnb

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]


def weight_memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the weights as stored (``get_memory_footprint``, buffers included) and as float32 would hold
    them (logical element counts: 4-bit parameters pack two values per byte)."""
    elements = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        elements += torch.Size(shape).numel() if shape is not None else p.numel()
    elements += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    footprint = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else None
    return {"weight_bytes": int(footprint or 0), "float32_weight_bytes": int(elements * 4)}


# ---- the technique -----------------------------------------------------------------------------------------
class QuantizedBaseConfig(TechniqueConfig):
    name: Literal["quantized_base"] = "quantized_base"
    bits: Literal[4, 8] = Field(4, description="4: QLoRA NF4 (+ double quantization); 8: LLM.int8().")
    quant_type: Literal["nf4", "fp4"] | None = Field(None, description="4-bit data type (default nf4).")
    double_quant: bool | None = Field(None, description="4-bit: quantize the absmax constants too (default true).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit matmul dtype (default bfloat16 on a bf16 GPU, else float32)."
    )
    int8_threshold: float | None = Field(
        None, gt=0, description="8-bit: outlier threshold; larger features go through fp16 (default 6.0)."
    )
    skip_modules: list[str] | None = Field(
        None, description="Modules left unquantized (default: transformers' choice, the output head)."
    )
    paged_optimizer: bool = Field(
        True, description="On CUDA, training.optim paged_adamw_8bit (QLoRA) unless training.optim is set."
    )


@register_technique
class QuantizedBaseTechnique(Technique):
    """Quantizes the frozen base at load time (or by reload for built-ins), prepares it for k-bit training."""

    name = "quantized_base"
    Config = QuantizedBaseConfig
    survey_section = "Memory efficiency / Quantized training"
    paper = (
        'Dettmers et al. 2022, "LLM.int8()", arXiv 2208.07339; Dettmers et al. 2023, "QLoRA: Efficient Finetuning '
        'of Quantized LLMs", arXiv 2305.14314'
    )
    requires = frozenset({"peft"})  # a frozen quantized base only trains through adapters
    order = ORDER_ADAPTER - 10  # quantize before peft (ORDER_ADAPTER) wraps the model

    config: QuantizedBaseConfig

    def __init__(self, config: QuantizedBaseConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._from_pretrained = False
        self._user_optim = False
        self._memory: dict[str, int] = {}
        self._paged = False

    @classmethod
    def status(cls) -> str:
        return "ready" if has_package("bitsandbytes") else "needs bitsandbytes"

    def quantization_config(self, cuda: bool | None = None, bf16: bool | None = None):
        c = self.config
        if cuda is None:
            cuda = torch.cuda.is_available()
            bf16 = cuda and torch.cuda.is_bf16_supported()
        compute = c.compute_dtype or ("bfloat16" if cuda and bf16 else "float32")
        return bnb_config(
            c.bits,
            quant_type=c.quant_type or "nf4",
            double_quant=True if c.double_quant is None else c.double_quant,
            compute_dtype=compute,
            int8_threshold=6.0 if c.int8_threshold is None else c.int8_threshold,
            skip_modules=c.skip_modules,
        )

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        if "bitsandbytes" not in env.installed:
            raise MissingDependencyError("name", "bitsandbytes", "bnb")
        wrong = FOUR_BIT_FIELDS if c.bits == 8 else EIGHT_BIT_FIELDS
        for key in wrong:
            if getattr(c, key) is not None:
                raise RecipeError(key, f"only used with bits: {4 if c.bits == 8 else 8}; remove it (bits is {c.bits})")
        if c.compute_dtype == "bfloat16" and env.cuda and not env.bf16_supported:
            raise RecipeError("compute_dtype", "this GPU has no bfloat16; use float16 or float32")
        self._from_pretrained = recipe.model.loads_weights()
        self._user_optim = "optim" in recipe.training

    def model_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # from_config (built-ins, from_scratch) takes no quantization_config; on_model quantizes those by reload.
        if self._from_pretrained:
            kwargs = {**kwargs, "quantization_config": self.quantization_config()}
            if (dm := device_map()) is not None:
                kwargs.setdefault("device_map", dm)
        return kwargs

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import peft

        before = None if is_quantized(model) else weight_memory(model)["weight_bytes"]
        model = quantize_model(model, self.quantization_config())
        # fp32 norms and embeddings, base frozen; checkpointing is the gradient_checkpointing technique's job.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        self._memory = {**weight_memory(model), "quantized_layers": len(quantized_linears(model))}
        if before is not None:
            self._memory["unquantized_weight_bytes"] = before
        logger.info("quantized_base: %d-bit base, weights %.2f MB (float32: %.2f MB)", self.config.bits,
                    self._memory["weight_bytes"] / 1e6, self._memory["float32_weight_bytes"] / 1e6)  # fmt: skip
        return model

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        # QLoRA's paged optimizer: its state moves to CPU under GPU memory pressure (CUDA unified memory).
        if self.config.paged_optimizer and torch.cuda.is_available() and not self._user_optim:
            args.optim = OptimizerNames(PAGED_OPTIM)
            self._paged = True
        return args

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bits": self.config.bits, **self._memory}
        if self.config.bits == 4:
            q = self.quantization_config()
            out.update(quant_type=q.bnb_4bit_quant_type, double_quant=q.bnb_4bit_use_double_quant)
        out["optim"] = PAGED_OPTIM if self._paged else None
        return out
