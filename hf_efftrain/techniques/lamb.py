"""LAMB, Adam with a per-tensor trust ratio, for large-batch training.

You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020, arXiv 1904.00962,
Algorithm 2. Per parameter tensor ``w`` with gradient ``g`` at step ``t``::

    m     = b1 * m + (1 - b1) * g                  v     = b2 * v + (1 - b2) * g^2
    m_hat = m / (1 - b1^t)                         v_hat = v / (1 - b2^t)
    r     = m_hat / (sqrt(v_hat) + eps) + wd * w   (weight decay inside the update)
    trust = phi(||w||) / ||r||                     (1 when ||w|| = 0 or ||r|| = 0)
    w     = w - lr * trust * r

with ``phi(z) = min(max(z, gamma_l), gamma_u)`` when ``weight_norm_clamp=(gamma_l, gamma_u)`` is given and the
identity otherwise (the paper allows both). A tensor excluded from adaptation takes ``trust = 1``: its update is
then exactly AdamW's ``w = w * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps)``.

Which tensors are excluded is a per-group flag, ``adapt``, next to the usual per-group ``weight_decay``: torch
optimizers see tensors, not names. ``lamb_param_groups(model, ...)`` builds the groups from parameter names
(default: biases and normalization weights are excluded from both decay and adaptation, as in the reference BERT
implementation and as ``Trainer.get_decay_parameter_names`` excludes them from decay).

With the stock Trainer, either hand it the factory, which Trainer.create_optimizer calls with the model so that the
groups are built from names (this also works under DeepSpeed and FSDP, where the optimizer must be built late)::

    Trainer(..., optimizer_cls_and_kwargs=(LambFactory, {"lr": 2e-3, "weight_decay": 0.01}))

or pass ``Lamb`` itself, in which case the Trainer's own decay / no-decay groups are used and every tensor is
adapted: ``optimizer_cls_and_kwargs=(Lamb, {"lr": 2e-3})``.

The trust ratio is per tensor the optimizer steps. That is the layer on one device and under DDP; DeepSpeed ZeRO
flattens each group into partitions and FSDP (v1) hands out flat shards, so there the ratio would be per shard, not
per layer: the technique warns in those set-ups.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from transformers import TrainingArguments

from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig
from ..errors import RecipeError
from ..runtime.distributed import recipe_optimizer_problem

logger = logging.getLogger(__name__)

# The Trainer's no-decay rule (Trainer.get_decay_parameter_names): these regexes, searched in the lowercased
# parameter name, plus every parameter of an nn.LayerNorm module.
DEFAULT_EXCLUDE = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def lamb_trust_ratio(
    weight: torch.Tensor, update: torch.Tensor, weight_norm_clamp: tuple[float, float] | None = None
) -> torch.Tensor:
    """``phi(||weight||) / ||update||`` as a 0-dim tensor (at least float32); 1 where a norm is 0 (Algorithm 2)."""
    acc = torch.promote_types(weight.dtype, torch.float32)  # bf16/fp16 norms are accumulated in float32
    w_norm = torch.linalg.vector_norm(weight, dtype=acc)
    r_norm = torch.linalg.vector_norm(update, dtype=acc)
    phi = w_norm if weight_norm_clamp is None else w_norm.clamp(*weight_norm_clamp)
    ok = (w_norm > 0) & (r_norm > 0)
    # where() evaluates both branches: divide by a safe denominator so the unused one is never inf/nan.
    return torch.where(ok, phi / torch.where(ok, r_norm, torch.ones_like(r_norm)), torch.ones_like(r_norm))


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, Algorithm 2). Per-group options: ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``adapt`` (False: trust ratio 1, i.e. AdamW) and ``weight_norm_clamp`` (``(gamma_l, gamma_u)`` or None).

    State per parameter: ``step`` (float32 scalar, as torch AdamW), ``exp_avg`` and ``exp_avg_sq``. The trust ratios
    of the last step are kept in ``last_trust_ratios`` (parameter -> 0-dim tensor), not in the state.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        adapt: bool = True,
        weight_norm_clamp: tuple[float, float] | None = None,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (each must be in [0, 1))")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be >= 0)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        if weight_norm_clamp is not None:
            _check_clamp(weight_norm_clamp)
            weight_norm_clamp = tuple(weight_norm_clamp)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "adapt": adapt,
            "weight_norm_clamp": weight_norm_clamp,
        }
        super().__init__(params, defaults)
        self.last_trust_ratios: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_trust_ratios = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # r = m_hat / (sqrt(v_hat) + eps) + wd * w, in a fresh buffer (the state must not change).
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                r = (m / (1 - beta1**t)).div_(denom)
                if wd != 0:
                    r.add_(p, alpha=wd)
                if group["adapt"]:
                    trust = lamb_trust_ratio(p, r, group["weight_norm_clamp"])
                    self.last_trust_ratios[p] = trust
                    r.mul_(trust.to(r.dtype))
                p.add_(r, alpha=-lr)
        return loss


def _check_clamp(clamp: Sequence[float]) -> None:
    if len(clamp) != 2 or not 0.0 <= clamp[0] <= clamp[1]:
        raise ValueError(f"weight_norm_clamp must be (gamma_l, gamma_u) with 0 <= gamma_l <= gamma_u, got {clamp}")


def _excluded(model: torch.nn.Module, patterns: Sequence[str] | None) -> set[str]:
    """Names of parameters matched by ``patterns`` (regexes searched in the lowercased name); None: the Trainer's
    no-decay rule (DEFAULT_EXCLUDE plus nn.LayerNorm parameters)."""
    compiled = [re.compile(p) for p in (DEFAULT_EXCLUDE if patterns is None else patterns)]
    names = {n for n, _ in model.named_parameters() if any(c.search(n.lower()) for c in compiled)}
    if patterns is None:
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                names |= {f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters()}
    return names


def lamb_param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    exclude_from_weight_decay: Sequence[str] | None = None,
    exclude_from_adaptation: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for ``Lamb`` from parameter names (trainable parameters only; empty groups dropped).

    ``exclude_from_weight_decay``: regexes searched in the lowercased name; None = the Trainer's rule (biases and
    normalization weights). ``exclude_from_adaptation``: the same, for the trust ratio; None = the same set as decay
    (the reference implementation's default). ``[]`` excludes nothing.
    """
    no_decay = _excluded(model, exclude_from_weight_decay)
    no_adapt = no_decay if exclude_from_adaptation is None else _excluded(model, exclude_from_adaptation)
    buckets: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((name not in no_decay, name not in no_adapt), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "adapt": adapt}
        for (decay, adapt), params in sorted(buckets.items(), reverse=True)
    ]


class LambFactory:
    """transformers' optimizer-factory protocol: ``Trainer.create_optimizer`` calls ``LambFactory()(model, **kw)``
    (any ``optimizer_cls_and_kwargs`` class that is not a torch Optimizer is treated as a factory), so the groups
    can be built from the names of the model the Trainer is about to train (after DeepSpeed / FSDP wrapping)."""

    def __call__(
        self,
        model: torch.nn.Module,
        *,
        weight_decay: float = 0.0,
        exclude_from_weight_decay: Sequence[str] | None = None,
        exclude_from_adaptation: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Lamb:
        groups = lamb_param_groups(model, weight_decay, exclude_from_weight_decay, exclude_from_adaptation)
        return Lamb(groups, weight_decay=weight_decay, **kwargs)


Beta = Annotated[float, Field(ge=0, lt=1)]
NonNeg = Annotated[float, Field(ge=0)]


class LambConfig(TechniqueConfig):
    name: Literal["lamb"] = "lamb"
    lr: float | None = Field(None, gt=0, description="Learning rate; overrides training.learning_rate.")
    weight_decay: float | None = Field(
        None, ge=0, description="Weight decay, added inside the update r; overrides training.weight_decay."
    )
    betas: tuple[Beta, Beta] | None = Field(
        None, description="(beta1, beta2); default training.adam_beta1 / adam_beta2."
    )
    eps: float | None = Field(None, gt=0, description="Added to sqrt(v_hat); default training.adam_epsilon.")
    exclude_from_weight_decay: list[str] | None = Field(
        None,
        description="Regexes searched in lowercased parameter names; matches get no weight decay. "
        "Default: the Trainer's rule (biases and normalization weights); [] excludes nothing.",
    )
    exclude_from_adaptation: list[str] | None = Field(
        None,
        description="Regexes for tensors that take trust ratio 1 (plain AdamW update). "
        "Default: the same tensors as exclude_from_weight_decay; [] excludes nothing.",
    )
    weight_norm_clamp: tuple[NonNeg, NonNeg] | None = Field(
        None, description="(gamma_l, gamma_u): phi(||w||) = clamp(||w||, gamma_l, gamma_u); default phi(z) = z."
    )


@register_technique
class LambTechnique(Technique):
    """Replaces the Trainer's optimizer with LAMB; groups are built from parameter names through ``LambFactory``."""

    name = "lamb"
    Config = LambConfig
    survey_section = "Computation efficiency / Optimization"
    paper = (
        'You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", arXiv 1904.00962'
    )
    conflicts = frozenset({"optimizer", "lion"})

    config: LambConfig
    _trainer: Any = None

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        for key in ("exclude_from_weight_decay", "exclude_from_adaptation"):
            for i, pattern in enumerate(getattr(c, key) or []):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise RecipeError(f"{key}[{i}]", f"not a regular expression ({e})") from None
        if c.weight_norm_clamp is not None and c.weight_norm_clamp[0] > c.weight_norm_clamp[1]:
            raise RecipeError("weight_norm_clamp", "must be [gamma_l, gamma_u] with gamma_l <= gamma_u")
        problem = recipe_optimizer_problem(env.distributed_type, env.deepspeed_config)
        if problem:
            raise RecipeError("name", f"lamb: {problem}")

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        if self.config.lr is not None:
            args.learning_rate = self.config.lr
        if self.config.weight_decay is not None:
            args.weight_decay = self.config.weight_decay
        return args

    def optimizer_cls_and_kwargs(self, args: TrainingArguments) -> tuple[Any, dict[str, Any]]:
        c = self.config
        return LambFactory, {
            "lr": args.learning_rate,
            "betas": tuple(c.betas) if c.betas is not None else (args.adam_beta1, args.adam_beta2),
            "eps": c.eps if c.eps is not None else args.adam_epsilon,
            "weight_decay": args.weight_decay,
            "exclude_from_weight_decay": c.exclude_from_weight_decay,
            "exclude_from_adaptation": c.exclude_from_adaptation,
            "weight_norm_clamp": c.weight_norm_clamp,
        }

    def on_trainer(self, trainer: Any) -> None:
        self._trainer = trainer  # report() reads the optimizer the Trainer built
        if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
            logger.warning(
                "lamb: DeepSpeed ZeRO / FSDP give the optimizer flattened or sharded tensors, so the trust ratio is "
                "computed per shard rather than per layer; use DDP for exact LAMB."
            )

    def report(self) -> dict[str, Any]:
        opt = getattr(self._trainer, "optimizer", None)
        while opt is not None and not isinstance(opt, Lamb) and getattr(opt, "optimizer", None) is not None:
            opt = opt.optimizer  # Accelerate / DeepSpeed wrappers
        if not isinstance(opt, Lamb):
            return {"optimizer": "Lamb"}
        groups = opt.param_groups
        ratios = [float(r) for r in opt.last_trust_ratios.values()]
        out: dict[str, Any] = {
            "optimizer": "Lamb",
            "tensors_adapted": sum(len(g["params"]) for g in groups if g["adapt"]),
            "tensors_not_adapted": sum(len(g["params"]) for g in groups if not g["adapt"]),
            "tensors_decayed": sum(len(g["params"]) for g in groups if g["weight_decay"] > 0),
        }
        if ratios:
            ratios.sort()
            out["last_trust_ratio"] = {"min": ratios[0], "median": ratios[len(ratios) // 2], "max": ratios[-1]}
        return out
