"""Lion, the sign-momentum optimizer found by program search.

Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023, arXiv 2302.06675 (Algorithm 2,
decoupled weight decay). Per parameter, with gradient g and momentum m::

    c     = b1 * m + (1 - b1) * g
    theta = theta - lr * (sign(c) + wd * theta)
    m     = b2 * m + (1 - b2) * g

Lion keeps one state tensor per parameter (AdamW keeps two), and every update has the same magnitude per
element, so it wants a learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW (paper, Sec. 5).

Functional core: ``Lion(params, lr=..., betas=..., weight_decay=...)``, usable with any training loop or with the
stock Trainer as ``Trainer(..., optimizer_cls_and_kwargs=(Lion, {"lr": 1e-4}))``; ``lion_hparams_from_adamw``.

8-bit and paged state (``bits: 8``, ``paged: true``) come from bitsandbytes (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861): the momentum ``m`` is kept as uint8 codes of a dynamic quantization
map with one float32 absmax per block of 256 elements, i.e. about 1.016 bytes per element instead of 4 (tensors
under ``min_8bit_size`` elements keep float32 state). The classes are ``bnb.optim.Lion`` / ``PagedLion`` with
``optim_bits=8`` (exactly what ``Lion8bit`` / ``PagedLion8bit`` construct), the same objects the Trainer builds for
``optim: lion_8bit``; passing ``optim_bits`` also makes the Trainer keep ``nn.Embedding`` states in 32 bits, as it
does for its own bitsandbytes optimizers. Paged state lives in CUDA unified memory, so it needs CUDA.

This technique is the one way to get Lion: the Trainer's names (``lion_32bit``, ``lion_8bit``, ``paged_lion_32bit``,
``paged_lion_8bit``) are refused in ``training.optim`` and in the ``optimizer`` technique, naming the entry here
(``{name: lion, bits: 8, paged: true}``) that builds the same optimizer.

``from_adamw: {lr, weight_decay, factor}`` applies the paper's conversion rule (Sec. 5): ``lr = lr_AdamW / factor``
and ``weight_decay = wd_AdamW * factor``, so the effective decay ``lr * weight_decay`` stays the same.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import TrainingArguments

from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig, has_package
from ..errors import MissingDependencyError, RecipeError
from ..runtime.distributed import recipe_optimizer_problem

logger = logging.getLogger(__name__)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, Algorithm 2). State: one ``exp_avg`` tensor per parameter, shaped like it.

    ``foreach=None`` uses the ``torch._foreach_*`` path when all parameters with gradients sit on one device and a
    per-tensor loop otherwise; both give bitwise the same result.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (each must be in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "foreach": foreach}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue

            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device for p in params}) == 1
            beta1, beta2 = group["betas"]
            update = _lion_foreach if foreach else _lion_loop
            update(params, grads, exp_avgs, lr=group["lr"], beta1=beta1, beta2=beta2, wd=group["weight_decay"])
        return loss


def _lion_loop(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    wd: float,
) -> None:
    for p, g, m in zip(params, grads, exp_avgs):
        if wd != 0:
            p.mul_(1 - lr * wd)
        c = m.mul(beta1).add_(g, alpha=1 - beta1).sign_()
        p.add_(c, alpha=-lr)
        m.mul_(beta2).add_(g, alpha=1 - beta2)


def _lion_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    wd: float,
) -> None:
    # _foreach_* kernels need one device and dtype per call.
    groups: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], []])
    for p, g, m in zip(params, grads, exp_avgs):
        bucket = groups[(p.device, p.dtype)]
        bucket[0].append(p)
        bucket[1].append(g)
        bucket[2].append(m)
    for ps, gs, ms in groups.values():
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        cs = torch._foreach_mul(ms, beta1)
        torch._foreach_add_(cs, gs, alpha=1 - beta1)
        torch._foreach_sign_(cs)
        torch._foreach_add_(ps, cs, alpha=-lr)
        torch._foreach_mul_(ms, beta2)
        torch._foreach_add_(ms, gs, alpha=1 - beta2)


# The paper's range is 3-10x (Sec. 5). We default to its low end: the smallest change from a tuned AdamW setting,
# and the end that worked for language models (an earlier version of Sec. 5: "sometimes a learning rate that is
# 3x smaller may perform slightly better"; lucidrains/lion-pytorch's enwik8 runs: /3 beat Adam, /10 was worst).
DEFAULT_FROM_ADAMW_FACTOR = 3.0
PAPER_FACTOR_RANGE = (3.0, 10.0)


def lion_hparams_from_adamw(
    lr: float, weight_decay: float, factor: float = DEFAULT_FROM_ADAMW_FACTOR
) -> tuple[float, float]:
    """Lion's ``(lr, weight_decay)`` from AdamW's by the paper's rule (Sec. 5): lr / factor, weight_decay * factor,
    so that the effective decay ``lr * weight_decay`` is unchanged. Warns outside the paper's range of 3-10."""
    if not factor >= 1.0:
        raise ValueError(f"factor must be >= 1 (Lion wants a smaller lr than AdamW), got {factor}")
    lo, hi = PAPER_FACTOR_RANGE
    if not lo <= factor <= hi:
        logger.warning("Lion from_adamw factor %g is outside the paper's range of %g-%g (Sec. 5).", factor, lo, hi)
    return lr / factor, weight_decay * factor


class FromAdamW(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    lr: float | None = Field(None, gt=0, description="AdamW learning rate to convert; default training.learning_rate.")
    weight_decay: float | None = Field(
        None, ge=0, description="AdamW weight decay to convert; default training.weight_decay."
    )
    factor: float = Field(
        DEFAULT_FROM_ADAMW_FACTOR,
        ge=1,
        description="lr is divided and weight decay multiplied by this (paper: 3-10; others warn). Default 3.",
    )


class LionConfig(TechniqueConfig):
    name: Literal["lion"] = "lion"
    lr: float | None = Field(
        None, gt=0, description="Learning rate; overrides training.learning_rate (paper: 3-10x below AdamW's)."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="Interpolation factor between momentum and gradient for c.")
    beta2: float = Field(0.99, ge=0, lt=1, description="Momentum decay (the EMA of gradients kept as state).")
    weight_decay: float | None = Field(
        None, ge=0, description="Decoupled weight decay; overrides training.weight_decay (paper: 3-10x AdamW's)."
    )
    from_adamw: FromAdamW | None = Field(
        None,
        description="Derive lr and weight_decay from AdamW settings {lr, weight_decay, factor} by the paper's rule "
        "(lr / factor, weight_decay * factor); not together with lr or weight_decay.",
    )
    bits: Literal[8, 32] = Field(32, description="Momentum precision: 32 (torch Lion) or 8 (bitsandbytes block-wise).")
    paged: bool = Field(False, description="Page the optimizer state through CUDA unified memory (bitsandbytes).")
    min_8bit_size: int | None = Field(
        None, ge=1, description="bits 8: tensors with fewer elements keep 32-bit state; default bitsandbytes' 4096."
    )
    foreach: bool | None = Field(
        None,
        description="torch Lion only: use torch._foreach_* kernels; null picks them when all parameters share a "
        "device.",
    )


@register_technique
class LionTechnique(Technique):
    """Replaces the Trainer's optimizer with Lion (torch, or bitsandbytes for 8-bit / paged state); the Trainer still
    builds the decay/no-decay groups and the scheduler around it."""

    name = "lion"
    Config = LionConfig
    survey_section = "Computation efficiency / Optimization"
    paper = 'Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675'
    conflicts = frozenset({"optimizer"})

    config: LionConfig
    _converted: dict[str, Any] | None = None  # what from_adamw chose, for report()

    @classmethod
    def status(cls) -> str:
        return "ready" if has_package("bitsandbytes") else "ready (bits 8 / paged need bitsandbytes)"

    def _check_from_adamw(self) -> None:
        c = self.config
        if c.from_adamw is not None:
            for key in ("lr", "weight_decay"):
                if getattr(c, key) is not None:
                    raise RecipeError(key, f"set either {key} or from_adamw (which computes {key}), not both")

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        self._check_from_adamw()
        bnb = c.bits == 8 or c.paged
        if bnb and "bitsandbytes" not in env.installed:
            raise MissingDependencyError("bits" if c.bits == 8 else "paged", "bitsandbytes", "bnb")
        if c.paged and not env.cuda:
            raise RecipeError(
                "paged", "paged optimizer state lives in CUDA unified memory and needs a CUDA GPU; set paged: false"
            )
        if bnb and c.foreach is not None:
            raise RecipeError("foreach", "only used by the torch Lion (bits: 32, paged: false); remove it")
        if c.bits == 32 and c.min_8bit_size is not None:
            raise RecipeError("min_8bit_size", "only used with bits: 8; remove it")
        problem = recipe_optimizer_problem(env.distributed_type, env.deepspeed_config)
        if problem:
            raise RecipeError("name", f"lion: {problem}")

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        c = self.config
        self._check_from_adamw()
        if c.from_adamw is not None:
            f = c.from_adamw
            adamw_lr = f.lr if f.lr is not None else args.learning_rate
            adamw_wd = f.weight_decay if f.weight_decay is not None else args.weight_decay
            args.learning_rate, args.weight_decay = lion_hparams_from_adamw(adamw_lr, adamw_wd, f.factor)
            self._converted = {
                "from_adamw": {"lr": adamw_lr, "weight_decay": adamw_wd, "factor": f.factor},
                "lr": args.learning_rate,
                "weight_decay": args.weight_decay,
            }
        if c.lr is not None:
            args.learning_rate = c.lr
        if c.weight_decay is not None:
            args.weight_decay = c.weight_decay
        return args

    def optimizer_cls_and_kwargs(self, args: TrainingArguments) -> tuple[type, dict[str, Any]]:
        c = self.config
        kwargs: dict[str, Any] = {
            "lr": args.learning_rate,
            "betas": (c.beta1, c.beta2),
            "weight_decay": args.weight_decay,
        }
        if c.bits == 32 and not c.paged:
            return Lion, {**kwargs, "foreach": c.foreach}
        import bitsandbytes as bnb

        kwargs["optim_bits"] = c.bits
        if c.min_8bit_size is not None:
            kwargs["min_8bit_size"] = c.min_8bit_size
        return (bnb.optim.PagedLion if c.paged else bnb.optim.Lion), kwargs

    def report(self) -> dict[str, Any]:
        c = self.config
        cls = "Lion" if c.bits == 32 and not c.paged else f"bitsandbytes.optim.{'PagedLion' if c.paged else 'Lion'}"
        out: dict[str, Any] = {"optimizer": cls, "state_bits": c.bits, "paged": c.paged, "state_tensors_per_param": 1}
        if self._converted is not None:
            out.update(self._converted)
        return out
