"""Mixed-precision training: bf16/fp16 autocast over fp32 master weights, pure bf16, and fp8 linear layers.

Micikevicius et al., "Mixed Precision Training", ICLR 2018, arXiv 1710.03740 (survey Sec. "Memory efficiency /
Quantized training"): the forward and backward matmuls run in 16 bits while the optimizer updates an fp32 master copy
of the weights. fp16's 5-bit exponent underflows small gradients, so the loss is multiplied by a scale S before the
backward pass and the gradients divided by S before the step; dynamic scaling halves S (and skips the step) when a
gradient overflows and doubles it after ``growth_interval`` clean steps. bfloat16 has fp32's 8-bit exponent and needs
no scaling. Here Accelerate applies the autocast and its ``GradScaler`` does the dynamic scaling.

``pure_bf16`` drops the fp32 master copy: weights, gradients and optimizer state are all bf16, half the bytes of
fp32 weights + AdamW state. Zamirai et al., "Revisiting BFloat16 Training", arXiv 2010.06192, show why that alone
trains worse: with 8 significant bits, an update smaller than half a unit in the last place of the weight (2^-9 of
|w|) rounds back to w and is lost. Their remedies, both in ``BF16AdamW``: stochastic rounding (round up with the
probability given by the dropped fraction, so the expected weight is exact) and Kahan summation (a bf16 buffer keeps
the rounding error of each update and adds it back to the next one). ``update_rounding: nearest`` keeps the
Trainer's own optimizer on the bf16 weights (plain pure bf16).

``dtype: fp8`` (Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433) swaps ``nn.Linear`` layers
for torchao's ``Float8Linear`` (dynamic scaling, e4m3 matmuls on Ada/Hopper tensor cores, compute capability 8.9+);
everything else runs under bf16 autocast.

Functional cores for the stock Trainer: ``amp_training_args(args, "bf16")``, ``to_pure_bf16(model)`` with
``Trainer(optimizer_cls_and_kwargs=(BF16AdamW, {"rounding": "kahan"}))``, ``convert_to_fp8(model)``,
``set_loss_scaler(accelerator, init_scale, growth_interval)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from ..core.registry import get_technique, register_technique
from ..core.technique import Env, Technique, TechniqueConfig, has_package
from ..errors import MissingDependencyError, RecipeError
from ..runtime.distributed import DEEPSPEED, recipe_optimizer_problem

logger = logging.getLogger(__name__)

Rounding = Literal["nearest", "stochastic", "kahan"]
FP8_MIN_CAPABILITY = (8, 9)


# ---------------------------------------------------------------------------------------------------- AMP
def amp_training_args(
    args: TrainingArguments, dtype: Literal["bf16", "fp16"], full_eval: bool = False
) -> TrainingArguments:
    """``args`` with bf16 or fp16 autocast on (``mixed_precision``, which the Trainer hands to Accelerate)."""
    changes: dict[str, Any] = {dtype: True, f"{dtype}_full_eval": full_eval or getattr(args, f"{dtype}_full_eval")}
    if dtype == "bf16" and not args.use_cpu and not is_torch_bf16_gpu_available():
        # No bf16-capable accelerator: TrainingArguments only allows bf16 as CPU autocast, with use_cpu.
        logger.info("bf16: no bf16-capable accelerator, training on the CPU with CPU autocast")
        changes["use_cpu"] = True
    # replace() reruns __post_init__, which derives mixed_precision from bf16/fp16 (setting the flag alone does not).
    return dataclasses.replace(args, **changes)


def set_loss_scaler(accelerator: Any, init_scale: float = 2.0**16, growth_interval: int = 2000) -> bool:
    """Give an fp16 Accelerator a dynamic loss scaler with these settings (before ``prepare``: the optimizer wrapper
    takes the scaler then). Returns False when there is none to replace (bf16, or DeepSpeed's own scaling)."""
    old = getattr(accelerator, "scaler", None)
    if old is None:
        return False
    accelerator.scaler = type(old)(old._device, init_scale=init_scale, growth_interval=growth_interval)
    return True


# ---------------------------------------------------------------------------------------------------- pure bf16
def to_pure_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Cast every floating-point parameter to bf16 in place. Buffers keep their dtype (RoPE's inv_freq stays fp32)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    return model


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability (dropped low 16 bits) / 2^16: E[result] = x (Zamirai et al.)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # Adding the noise carries into bit 16 with exactly that probability; clearing the low half truncates.
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def add_update_(
    param: torch.Tensor,
    update: torch.Tensor,
    rounding: Rounding,
    compensation: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """``param += update`` for a low-precision ``param`` and an fp32 ``update``, rounded as asked."""
    old = param.to(torch.float32, copy=True)  # a copy even for an fp32 param: Kahan reads it after the write
    if rounding == "nearest":
        param.copy_(old + update)
    elif rounding == "stochastic":
        param.copy_(stochastic_round_to_bf16(old + update, generator))
    else:  # Kahan: carry what rounding dropped into the next update
        assert compensation is not None
        wanted = update + compensation.float()
        param.copy_(old + wanted)
        compensation.copy_(wanted - (param.float() - old))


class BF16AdamW(torch.optim.Optimizer):
    """AdamW for bf16 parameters with no fp32 copy (Loshchilov & Hutter, arXiv 1711.05101; Zamirai et al. 2020).

    State ``exp_avg``/``exp_avg_sq`` has the parameter's dtype; each step is computed in fp32, one tensor at a time,
    and written back with ``rounding``: ``stochastic`` (states too, so that Adam's slow second moment keeps moving),
    ``kahan`` (one more bf16 ``compensation`` buffer per parameter; states rounded to nearest) or ``nearest``.
    Stochastic rounding draws from a generator seeded with ``seed`` per device, so data-parallel replicas agree.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rounding: Rounding = "stochastic",
        seed: int = 0,
    ):
        if rounding not in ("nearest", "stochastic", "kahan"):
            raise ValueError(f"rounding must be nearest, stochastic or kahan, not {rounding!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.rounding, self.seed = rounding, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if self.rounding == "kahan":
                        state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                generator = self._generator(p.device) if self.rounding == "stochastic" else None
                for name, value in (("exp_avg", m), ("exp_avg_sq", v)):
                    stored = stochastic_round_to_bf16(value, generator) if generator is not None else value
                    state[name].copy_(stored)
                # Out of place: for fp32 parameters m and v are the stored states themselves.
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                update = (m / denom).mul_(-lr / (1 - beta1**t))
                if wd:
                    update.add_(p.float(), alpha=-lr * wd)  # decoupled weight decay, in the same rounded write
                add_update_(p, update, self.rounding, state.get("compensation"), generator)
        return loss


# ---------------------------------------------------------------------------------------------------- fp8
def fp8_linear_filter(skip: Sequence[str] = ("lm_head",)):
    """torchao's ``module_filter_fn``: Linear layers whose dims are multiples of 16 (fp8 GEMM tiles), except ``skip``
    (module names or their last components; the output head is commonly kept in higher precision)."""

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear):
            return False
        if any(fqn == s or fqn.endswith("." + s) for s in skip):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    return keep


def convert_to_fp8(model: torch.nn.Module, recipe: str = "tensorwise", skip: Sequence[str] = ("lm_head",)):
    """Swap eligible ``nn.Linear`` layers for torchao ``Float8Linear`` (in place); returns the model."""
    if not has_package("torchao"):
        raise MissingDependencyError("dtype", "torchao", "fp8")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    return convert_to_float8_training(model, config=config, module_filter_fn=fp8_linear_filter(skip))


def fp8_problem(env: Env) -> str | None:
    """Why fp8 training cannot run here, or None."""
    if not env.cuda:
        return "fp8 training needs a CUDA GPU with compute capability 8.9+ (Ada, Hopper); use bf16 here"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability()
        return f"fp8 training needs compute capability 8.9+ (Ada, Hopper); this GPU has {major}.{minor}; use bf16"
    return None


# ---------------------------------------------------------------------------------------------------- technique
ONLY_IF_NATIVE = (
    "bf16: train in fp32 instead (with a warning) where bf16 matmuls are not native: a CPU without AVX-512 or AMX, "
    "where torch emulates them many times slower than fp32, or a GPU older than Ampere."
)


class MixedPrecisionConfig(TechniqueConfig):
    name: Literal["mixed_precision"] = "mixed_precision"
    dtype: Literal["bf16", "fp16", "fp8"] = Field(
        "bf16", description="Compute precision: bf16 or fp16 autocast over fp32 weights, or fp8 linear layers."
    )
    pure_bf16: bool = Field(
        False, description="dtype bf16 only: weights and optimizer state in bf16 too, no fp32 master copy."
    )
    update_rounding: Rounding = Field(
        "stochastic",
        description="pure_bf16: how updates are written into bf16 weights: stochastic, kahan (one more bf16 "
        "buffer) or nearest (plain; keeps the Trainer's own optimizer).",
    )
    full_eval: bool = Field(False, description="bf16/fp16: also evaluate with the whole model cast to that dtype.")
    only_if_native: bool = Field(False, description=ONLY_IF_NATIVE)
    init_scale: float = Field(2.0**16, gt=0, description="fp16: initial dynamic loss scale.")
    growth_interval: int = Field(2000, ge=1, description="fp16: overflow-free steps before the loss scale doubles.")
    fp8_recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = Field(
        "tensorwise", description="fp8: torchao Float8LinearConfig recipe (scaling granularity)."
    )
    fp8_skip: tuple[str, ...] = Field(("lm_head",), description="fp8: Linear module names kept in bf16.")


_ONLY_FOR = {
    "pure_bf16": "bf16",
    "only_if_native": "bf16",
    "init_scale": "fp16",
    "growth_interval": "fp16",
    "fp8_recipe": "fp8",
    "fp8_skip": "fp8",
}


@register_technique
class MixedPrecisionTechnique(Technique):
    """AMP through TrainingArguments; pure bf16 casts the model and picks BF16AdamW; fp8 swaps Linear layers.

    The one way to set precision in a recipe: ``training.bf16`` / ``training.fp16`` are refused (core/recipe_checks.py)
    and ``bf16`` / ``fp16`` are this technique's documented aliases for ``dtype: bf16`` / ``dtype: fp16``."""

    name = "mixed_precision"
    Config = MixedPrecisionConfig
    survey_section = "Memory efficiency / Quantized training"
    paper = (
        'Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740; Zamirai et al. 2020, "Revisiting '
        'BFloat16 Training", arXiv 2010.06192; Micikevicius et al. 2022, "FP8 Formats for Deep Learning", '
        "arXiv 2209.05433"
    )
    conflicts = frozenset({"bf16", "fp16"})
    dtype_field: ClassVar[str] = "dtype"  # the field errors about the dtype point at (the aliases: "name")

    config: MixedPrecisionConfig

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.settings = self.resolve()
        self.skipped: str | None = None  # why bf16 is off on this machine (only_if_native), set by validate

    @property
    def active(self) -> bool:
        return self.skipped is None

    def resolve(self) -> MixedPrecisionConfig:
        """The full settings this technique runs with (the aliases fix the dtype)."""
        return self.config

    def validate(self, recipe: Any, env: Env) -> None:
        s = self.settings
        for key, dtype in _ONLY_FOR.items():
            if key in s.model_fields_set and s.dtype != dtype:
                raise RecipeError(key, f"only used with dtype {dtype}, not {s.dtype}; remove it")
        if s.only_if_native and recipe is not None and recipe.model.dtype in ("bfloat16", "float16"):
            raise RecipeError("only_if_native", f"model.dtype {recipe.model.dtype} computes in 16-bit on any machine: "
                              "there is no fp32 to fall back to; remove only_if_native or model.dtype")  # fmt: skip
        if "update_rounding" in s.model_fields_set and not s.pure_bf16:
            raise RecipeError("update_rounding", "only used with pure_bf16: true; remove it")
        if s.dtype == "fp16" and not env.cuda:
            # TrainingArguments accepts fp16 with use_cpu, but Accelerate then runs neither autocast nor a scaler.
            raise RecipeError(self.dtype_field, "fp16 mixed precision needs a CUDA GPU; use bf16 on CPU")
        self.skipped = None
        if s.dtype == "bf16" and not env.bf16_native:
            self._not_native(env)
        if s.dtype in ("bf16", "fp8") and env.cuda and not env.bf16_supported and self.active:
            raise RecipeError(
                self.dtype_field, "this GPU has no bf16 support (needs Ampere, compute capability 8.0+); use fp16"
            )
        if s.dtype == "fp8":
            problem = fp8_problem(env)
            if problem:
                raise RecipeError(self.dtype_field, problem)
            if not has_package("torchao"):
                raise MissingDependencyError(self.dtype_field, "torchao", "fp8")
        if s.pure_bf16 and "full_eval" in s.model_fields_set:
            raise RecipeError("full_eval", "a pure bf16 model is evaluated in bf16 anyway; remove it")
        if s.pure_bf16 and env.distributed_type == DEEPSPEED:
            raise RecipeError("pure_bf16", "DeepSpeed keeps its own fp32 master weights; use dtype bf16 (AMP) with it")
        if s.pure_bf16 and s.update_rounding != "nearest":
            problem = recipe_optimizer_problem(env.distributed_type, env.deepspeed_config)
            if problem:
                raise RecipeError("update_rounding", f"BF16AdamW: {problem}")
        if s.pure_bf16 and recipe is not None:
            if recipe.model.dtype not in (None, "bfloat16"):
                raise RecipeError("pure_bf16", f"model.dtype is {recipe.model.dtype}; remove it or use bfloat16")
            if s.update_rounding != "nearest":
                # A technique that can choose the optimizer would be overridden by BF16AdamW, or clash with it.
                choosers = [
                    n
                    for n in recipe.technique_names()
                    if get_technique(n).optimizer_cls_and_kwargs is not Technique.optimizer_cls_and_kwargs
                    and n != self.name
                ]
                if choosers or "optim" in recipe.training:
                    other = ", ".join(choosers) if choosers else "training.optim"
                    raise RecipeError(
                        "update_rounding",
                        f"{s.update_rounding} rounding brings its own optimizer (BF16AdamW), which {other} would "
                        f"also set; remove {other} or use update_rounding: nearest (then {other}'s optimizer "
                        "updates the bf16 weights as they are)",
                    )

    def _not_native(self, env: Env) -> None:
        """bf16 where its matmuls are emulated: skip it (only_if_native) or warn that it is slow here."""
        from ..runtime.flops import cpu_description

        device = "GPU (no bf16 before Ampere)" if env.cuda else f"CPU ({cpu_description()})"
        if self.settings.only_if_native:
            self.skipped = f"no native bf16 matmuls on this {device}; trained in fp32 (only_if_native: true)"
            logger.warning("%s: %s", self.name, self.skipped)
        elif not env.cuda:
            logger.warning(
                "%s: this CPU has no native bf16 matmuls (%s): torch emulates them, many times slower than fp32. "
                "Remove %s for speed, or set only_if_native: true to train in fp32 where bf16 is emulated.",
                self.name, cpu_description(), self.name,
            )  # fmt: skip

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        s = self.settings
        if not self.active:
            return model
        if s.pure_bf16:
            return to_pure_bf16(model)
        if s.dtype == "fp8":
            return convert_to_fp8(model, s.fp8_recipe, s.fp8_skip)
        return model

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        s = self.settings
        if s.pure_bf16 or not self.active:  # pure bf16: the weights themselves are bf16, no autocast needed
            return args
        return amp_training_args(args, "fp16" if s.dtype == "fp16" else "bf16", s.full_eval)

    def only_training_args(self) -> bool:
        """True when all this does is set TrainingArguments (bf16/fp16 autocast, default loss scaling), so the stock
        Trainer runs it as it is (``Built.plain_trainer``, the benchmark baseline)."""
        s = self.settings
        return s.dtype != "fp8" and not s.pure_bf16 and not {"init_scale", "growth_interval"} & s.model_fields_set

    def optimizer_cls_and_kwargs(self, args: TrainingArguments) -> tuple[type, dict[str, Any]] | None:
        s = self.settings
        if not s.pure_bf16 or s.update_rounding == "nearest" or not self.active:
            return None
        return BF16AdamW, {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
            "weight_decay": args.weight_decay,
            "rounding": s.update_rounding,
            "seed": args.seed,
        }

    def on_trainer(self, trainer: Any) -> None:
        s = self.settings
        if s.dtype == "fp16":
            set_loss_scaler(trainer.accelerator, s.init_scale, s.growth_interval)

    def report(self) -> dict[str, Any]:
        return {"settings": self.settings.model_dump(mode="json"), "skipped": self.skipped}
