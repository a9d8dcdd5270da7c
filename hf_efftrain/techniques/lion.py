"""Lion, the sign-momentum optimizer found by program search.

Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023, arXiv 2302.06675 (Algorithm 2,
decoupled weight decay). Per parameter, with gradient g and momentum m::

    c     = b1 * m + (1 - b1) * g
    theta = theta - lr * (sign(c) + wd * theta)
    m     = b2 * m + (1 - b2) * g

Lion keeps one state tensor per parameter (AdamW keeps two), and every update has the same magnitude per
element, so it wants a learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW (paper, Sec. 5).

Functional core: ``Lion(params, lr=..., betas=..., weight_decay=...)``, usable with any training loop or with the
stock Trainer as ``Trainer(..., optimizer_cls_and_kwargs=(Lion, {"lr": 1e-4}))``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainingArguments

from ..registry import register_technique
from ..technique import Technique, TechniqueConfig

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
    foreach: bool | None = Field(
        None, description="Use torch._foreach_* kernels; null picks them when all parameters share one device."
    )


@register_technique
class LionTechnique(Technique):
    """Replaces the Trainer's optimizer with Lion; the Trainer still builds the decay/no-decay groups and the
    scheduler around it."""

    name = "lion"
    Config = LionConfig
    survey_section = "Computation efficiency / Optimization"
    paper = 'Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675'
    conflicts = frozenset({"optimizer"})

    config: LionConfig

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        if self.config.lr is not None:
            args.learning_rate = self.config.lr
        if self.config.weight_decay is not None:
            args.weight_decay = self.config.weight_decay
        return args

    def optimizer_cls_and_kwargs(self, args: TrainingArguments) -> tuple[type, dict[str, Any]]:
        return Lion, {
            "lr": args.learning_rate,
            "betas": (self.config.beta1, self.config.beta2),
            "weight_decay": args.weight_decay,
            "foreach": self.config.foreach,
        }

    def report(self) -> dict[str, Any]:
        return {"optimizer": "Lion", "state_tensors_per_param": 1}
