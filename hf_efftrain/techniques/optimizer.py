"""Choose the optimizer: a torch optimizer built here, or any optimizer the Trainer knows by name.

The survey's "Optimization" section (Zhuang et al. 2023, arXiv 2302.01107, Sec. 3.1) compares optimizers that
converge faster or keep less state: AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
arXiv 1711.05101), Adafactor (arXiv 1804.04235), 8-bit optimizers (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861). Lion, in every form (the Trainer's ``lion_8bit``, ``paged_lion_32bit``,
...), is the ``lion`` technique; those names are refused here with the ``lion`` entry to write instead.

``type`` is ``sgd``, ``adam`` or ``adamw`` (torch classes handed to the Trainer through
``optimizer_cls_and_kwargs``) or a ``TrainingArguments.optim`` name such as ``adamw_bnb_8bit`` or ``adafactor``,
which this technique writes into the TrainingArguments so that the Trainer builds it as usual.
Functional core: ``torch_optimizer_cls_and_kwargs(type, args, ...)`` for the stock Trainer.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ..core.recipe_checks import lion_replacement
from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig, has_package
from ..errors import MissingDependencyError, RecipeError
from ..runtime.distributed import recipe_optimizer_problem

TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
TRAINER_OPTIMIZERS: tuple[str, ...] = tuple(
    n.value for n in OptimizerNames if n.value not in TORCH_OPTIMIZERS and not lion_replacement(n.value)
)
# Names the Trainer builds from bitsandbytes (transformers.trainer_optimizer._BITSANDBYTES_OPTIMIZERS, less Lion's).
BNB_OPTIMIZERS = frozenset(
    n for n in TRAINER_OPTIMIZERS if "bnb" in n or "ademamix" in n or n.startswith("paged_")
) | {"adamw_8bit"}
# Other third-party packages, checked here so a missing one is a recipe error rather than a traceback mid-run.
_OTHER_PACKAGES = {
    "galore": "galore_torch",
    "apollo": "apollo_torch",
    "adamw_torch_4bit": "torchao",
    "adamw_torch_8bit": "torchao",
    "schedule_free": "schedulefree",
    "grokadamw": "grokadamw",
    "lomo": "lomo_optim",
    "adalomo": "lomo_optim",
    "adamw_anyprecision": "torchdistx",
    "stable_adamw": "optimi",
    "adamw_torch_xla": "torch_xla",
    "adamw_torch_npu_fused": "torch_npu",
}

Beta = Annotated[float, Field(ge=0, lt=1)]


def torch_optimizer_cls_and_kwargs(
    type: str,
    args: TrainingArguments,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``(torch class, kwargs)`` for ``sgd``/``adam``/``adamw``; lr and weight decay come from ``args``, as do
    betas/eps unless given (the Trainer's own AdamW does the same)."""
    cls = TORCH_OPTIMIZERS[type]
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if type == "sgd":
        kwargs["momentum"] = momentum if momentum is not None else 0.0
    else:
        kwargs["betas"] = tuple(betas) if betas is not None else (args.adam_beta1, args.adam_beta2)
        kwargs["eps"] = eps if eps is not None else args.adam_epsilon
    kwargs.update(extra or {})
    return cls, kwargs


def optim_args_string(extra: dict[str, Any]) -> str:
    """``{"a": 1, "b": True}`` -> ``"a=1,b=True"``, the format ``TrainingArguments.optim_args`` is parsed from."""
    return ",".join(f"{k}={v}" for k, v in extra.items())


class OptimizerConfig(TechniqueConfig):
    name: Literal["optimizer"] = "optimizer"
    type: str = Field(
        description="sgd, adam or adamw (torch classes), or any TrainingArguments.optim name "
        "(adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, adafactor, ...) except Lion's (the lion technique)."
    )
    lr: float | None = Field(None, gt=0, description="Learning rate; overrides training.learning_rate.")
    weight_decay: float | None = Field(None, ge=0, description="Weight decay; overrides training.weight_decay.")
    betas: tuple[Beta, Beta] | None = Field(
        None, description="Adam-style (beta1, beta2); default training.adam_beta1/adam_beta2. Not for sgd."
    )
    eps: float | None = Field(
        None, gt=0, description="Adam-style epsilon; default training.adam_epsilon. Not for sgd."
    )
    momentum: float | None = Field(None, ge=0, description="SGD momentum (type sgd only); default 0.")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra optimizer keyword arguments: passed to the torch class, or as optim_args to the Trainer.",
    )

    @field_validator("type")
    @classmethod
    def _not_lion(cls, value: str) -> str:
        if lion_replacement(value):
            raise ValueError(f"{value} is Lion, which is the lion technique: write {lion_replacement(value)} instead")
        return value


@register_technique
class OptimizerTechnique(Technique):
    """Selects the optimizer; the Trainer still builds the decay/no-decay groups and the scheduler around it."""

    name = "optimizer"
    Config = OptimizerConfig
    survey_section = "Computation efficiency / Optimization"
    paper = (
        'Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", arXiv 1711.05101; '
        'Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861'
    )
    conflicts = frozenset({"lion"})

    config: OptimizerConfig

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        if c.type not in TORCH_OPTIMIZERS and c.type not in TRAINER_OPTIMIZERS:
            raise RecipeError(
                "type",
                f"unknown optimizer {c.type!r}; allowed: sgd, adam, adamw, or a TrainingArguments.optim name: "
                + ", ".join(TRAINER_OPTIMIZERS),
            )
        problem = recipe_optimizer_problem(env.distributed_type, env.deepspeed_config)
        if problem:
            raise RecipeError("type", f"{c.type}: {problem}")
        if c.type == "sgd" and (c.betas is not None or c.eps is not None):
            raise RecipeError("betas" if c.betas is not None else "eps", "not used by sgd; remove it")
        if c.type != "sgd" and c.momentum is not None:
            raise RecipeError("momentum", f"only used by type sgd, not {c.type!r}; pass other settings in args")
        for key in ("lr", "weight_decay", "betas", "eps", "momentum"):
            if key in c.args:
                raise RecipeError(f"args.{key}", f"set it with the technique's own field '{key}'")
        if c.type in TORCH_OPTIMIZERS:
            accepted = set(inspect.signature(TORCH_OPTIMIZERS[c.type]).parameters) - {"self", "params"}
            for key in c.args:
                if key not in accepted:
                    raise RecipeError(
                        f"args.{key}",
                        f"not an argument of torch.optim.{TORCH_OPTIMIZERS[c.type].__name__}; "
                        f"allowed: {', '.join(sorted(accepted))}",
                    )
            return
        for key, value in c.args.items():
            if any(ch in f"{key}{value}" for ch in ",= "):
                raise RecipeError(
                    f"args.{key}", "Trainer optim_args keys and values cannot contain ',', '=' or spaces"
                )
        if c.type in BNB_OPTIMIZERS and "bitsandbytes" not in env.installed:
            raise MissingDependencyError("type", "bitsandbytes", "bnb")
        for prefix, package in _OTHER_PACKAGES.items():
            if c.type.startswith(prefix) and not has_package(package):
                raise RecipeError("type", f"{c.type} needs the '{package}' package, which is not installed")

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        c = self.config
        changes: dict[str, Any] = {}
        if c.lr is not None:
            changes["learning_rate"] = c.lr
        if c.weight_decay is not None:
            changes["weight_decay"] = c.weight_decay
        if c.type not in TORCH_OPTIMIZERS:
            # replace() reruns __post_init__, which turns the name into OptimizerNames and checks it.
            changes["optim"] = c.type
            changes["optim_args"] = optim_args_string(c.args) or None
            if c.betas is not None:
                changes["adam_beta1"], changes["adam_beta2"] = c.betas
            if c.eps is not None:
                changes["adam_epsilon"] = c.eps
        return dataclasses.replace(args, **changes) if changes else args

    def optimizer_cls_and_kwargs(self, args: TrainingArguments) -> tuple[type, dict[str, Any]] | None:
        c = self.config
        if c.type not in TORCH_OPTIMIZERS:
            return None  # the Trainer builds it from args.optim
        return torch_optimizer_cls_and_kwargs(c.type, args, c.betas, c.eps, c.momentum, c.args)
