"""Divergence guard: skip optimizer steps whose loss or gradient norm is not finite; after too many in a row, roll
back to the last good checkpoint with a lower learning rate, or stop with a clear message.

The rollback is the recipe large runs report for loss blow-ups: PaLM (Chowdhery et al. 2022, arXiv 2204.02311,
Sec. 5.1) restarts from a checkpoint before the spike and skips the data batches around it; OPT (Zhang et al. 2022,
arXiv 2205.01068, Sec. 2.5) restarts from an earlier checkpoint with a lower learning rate. Here the weights and
optimizer state come back from the newest valid checkpoint older than the last good weights, the learning rate
(optimizer groups and the scheduler's base rates) is multiplied by ``lr_factor``, and training goes on at the
current step with the next batches, so the batches that diverged are skipped and the schedule keeps its place.
A skipped step still counts as a step (data consumed, scheduler advanced); only the update is dropped.

Functional core: ``DivergenceGuard(max_consecutive, on_diverge, lr_factor, max_rollbacks)`` works with the stock
Trainer: ``guard.attach(trainer)`` before ``train()`` (adds its callback and observes the loss and grad norm).

It is a technique rather than core code because it fits the hook contract (``on_trainer`` + a callback + state for
resume) and is a choice with costs (one host sync per step, and under several processes one all-reduce).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainerCallback

from ..core.patching import Patches, patch_attr
from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig
from ..errors import RecipeError
from ..runtime.checkpoint import Diverged, any_rank, latest_valid_checkpoint

logger = logging.getLogger(__name__)


def is_finite(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


class DivergenceGuard:
    """Watches each optimizer step of a Trainer; see the module docstring. State (for resume and the run report):
    ``skipped_steps``, ``consecutive``, ``first_bad_step``, ``rollbacks``."""

    def __init__(
        self,
        max_consecutive: int = 3,
        on_diverge: Literal["rollback", "stop"] = "rollback",
        lr_factor: float = 0.5,
        max_rollbacks: int = 3,
    ):
        self.max_consecutive, self.on_diverge = max_consecutive, on_diverge
        self.lr_factor, self.max_rollbacks = lr_factor, max_rollbacks
        self.skipped_steps: list[int] = []
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self.rollbacks: list[dict[str, Any]] = []
        self.trainer: Any = None
        self._bad_loss = False
        self._grad_norm: Any = None
        self._skip = False
        self._patches = Patches()

    # ---- wiring -------------------------------------------------------------------------------------------------
    def attach(self, trainer: Any, add_callback: bool = True) -> None:
        if trainer.is_deepspeed_enabled:  # DeepSpeed steps inside backward(): there is no step to skip here
            raise RecipeError("divergence_guard", "does not run under DeepSpeed (its engine steps the optimizer "
                              "inside backward); use DDP or FSDP, or drop divergence_guard")  # fmt: skip
        self.trainer = trainer
        self._patches.add(patch_attr(trainer, "training_step", self._observe_loss(trainer.training_step)))
        self._patches.add(patch_attr(trainer, "_get_grad_norm", self._observe_grad_norm(trainer._get_grad_norm)))
        if add_callback:
            trainer.add_callback(self.callback())

    def detach(self) -> None:
        self._patches.undo()

    def callback(self) -> DivergenceGuardCallback:
        return DivergenceGuardCallback(self)

    def _observe_loss(self, training_step):
        def wrapped(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            self._bad_loss = self._bad_loss or not is_finite(loss)
            return loss

        return wrapped

    def _observe_grad_norm(self, get_grad_norm):
        def wrapped(*args, **kwargs):
            self._grad_norm = get_grad_norm(*args, **kwargs)  # the Trainer's global norm (DDP/FSDP aware)
            return self._grad_norm

        return wrapped

    def guarded_step(self, step):
        @functools.wraps(step)  # keeps the LR scheduler's marker on optimizer.step (else it warns)
        def wrapped(*args, **kwargs):
            if self._skip:
                return None
            return step(*args, **kwargs)

        return wrapped

    # ---- per step -----------------------------------------------------------------------------------------------
    def decide(self, args: Any) -> bool:
        """Before the optimizer step: skip it when the loss (any rank) or the gradient norm is not finite. With an
        fp16 GradScaler a non-finite gradient norm is the scaler's to handle (it skips and lowers the scale)."""
        scaler = getattr(self.trainer.accelerator, "scaler", None) if self.trainer is not None else None
        bad_norm = scaler is None and not is_finite(self._grad_norm)
        self._skip = any_rank(self._bad_loss, args.device) or bad_norm
        self._bad_loss, self._grad_norm = False, None
        return self._skip

    def after_step(self, args: Any, state: Any, optimizer: Any, lr_scheduler: Any) -> None:
        if not self._skip:
            self.consecutive, self.first_bad_step = 0, None
            return
        step = state.global_step
        self._skip = False
        self.skipped_steps.append(step)
        self.consecutive += 1
        self.first_bad_step = self.first_bad_step or step
        logger.warning("divergence_guard: non-finite loss or gradient norm at step %d, update skipped (%d in a row)",
                       step, self.consecutive)  # fmt: skip
        if self.consecutive < self.max_consecutive:
            return
        what = f"{self.consecutive} non-finite steps in a row (steps {self.first_bad_step}-{step})"
        if self.on_diverge == "stop":
            raise Diverged(f"training diverged: {what}; lower the learning rate or resume from a checkpoint")
        if len(self.rollbacks) >= self.max_rollbacks:
            raise Diverged(f"training diverged: {what} after {len(self.rollbacks)} rollbacks (max_rollbacks)")
        self.rollback(args, step, optimizer, lr_scheduler, what)

    def rollback(self, args: Any, step: int, optimizer: Any, lr_scheduler: Any, what: str) -> None:
        # The weights at first_bad_step - 1 led to the non-finite steps: go back further than them.
        path = latest_valid_checkpoint(args.output_dir, before_step=self.first_bad_step - 1)
        if path is None:
            raise Diverged(f"training diverged: {what}, and no valid checkpoint before step "
                           f"{self.first_bad_step - 1} in {args.output_dir} to roll back to")  # fmt: skip
        lrs = [g["lr"] for g in optimizer.param_groups]
        schedule = copy.deepcopy(lr_scheduler.state_dict())
        self.trainer._load_from_checkpoint(path)  # the Trainer's own loaders: weights, then optimizer state
        self.trainer._load_optimizer_and_scheduler(path)
        lr_scheduler.load_state_dict(schedule)  # keep the schedule at the current step
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr * self.lr_factor
        if hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = [b * self.lr_factor for b in lr_scheduler.base_lrs]
            lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        self.rollbacks.append({"step": step, "checkpoint": path, "lr": optimizer.param_groups[0]["lr"]})
        logger.warning("divergence_guard: %s; rolled back to %s, learning rate x%g -> %g", what, path,
                       self.lr_factor, optimizer.param_groups[0]["lr"])  # fmt: skip
        self.consecutive, self.first_bad_step = 0, None

    # ---- resume / report ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": list(self.skipped_steps),
            "consecutive": self.consecutive,
            "first_bad_step": self.first_bad_step,
            "rollbacks": [dict(r) for r in self.rollbacks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = list(state["skipped_steps"])
        self.consecutive, self.first_bad_step = state["consecutive"], state["first_bad_step"]
        self.rollbacks = [dict(r) for r in state["rollbacks"]]


class DivergenceGuardCallback(TrainerCallback):
    def __init__(self, guard: DivergenceGuard):
        self.guard = guard

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._step_patch = patch_attr(optimizer, "step", self.guard.guarded_step(optimizer.step))
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.guard.decide(args)
        return control

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.guard.after_step(args, state, optimizer, lr_scheduler)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._step_patch.undo()
        return control


class DivergenceGuardConfig(TechniqueConfig):
    name: Literal["divergence_guard"] = "divergence_guard"
    max_consecutive: int = Field(3, ge=1, description="Non-finite steps in a row before on_diverge acts.")
    on_diverge: Literal["rollback", "stop"] = Field(
        "rollback",
        description="rollback: reload the newest valid checkpoint older than the last good weights and multiply the "
        "learning rate by lr_factor; stop: end the run with an error (CLI exit code 3).",
    )
    lr_factor: float = Field(0.5, gt=0, le=1, description="Learning-rate multiplier applied at each rollback.")
    max_rollbacks: int = Field(3, ge=0, description="Rollbacks allowed before the run stops with an error.")


@register_technique
class DivergenceGuardTechnique(Technique):
    """Skips non-finite updates (counted in run_report.json) and rolls back or stops after too many in a row."""

    name = "divergence_guard"
    Config = DivergenceGuardConfig
    survey_section = "Computation efficiency / Optimization (training stability)"
    paper = 'Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", arXiv 2204.02311 (Sec. 5.1)'

    config: DivergenceGuardConfig

    def __init__(self, config=None, **kwargs: Any):
        super().__init__(config, **kwargs)
        c = self.config
        self.guard = DivergenceGuard(c.max_consecutive, c.on_diverge, c.lr_factor, c.max_rollbacks)

    def validate(self, recipe: Any, env: Env) -> None:
        if self.config.on_diverge == "rollback" and recipe.training.get("save_strategy", "no") == "no":
            raise RecipeError("on_diverge", "rollback needs checkpoints: set training.save_strategy (e.g. steps, "
                              "with save_steps), or use on_diverge: stop")  # fmt: skip

    def on_trainer(self, trainer: Any) -> None:
        self.guard.attach(trainer, add_callback=False)

    def callbacks(self) -> list[TrainerCallback]:
        return [self.guard.callback()]

    def state_dict(self) -> dict[str, Any]:
        return self.guard.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guard.load_state_dict(state)

    def report(self) -> dict[str, Any]:
        g = self.guard
        return {"skipped_steps": len(g.skipped_steps), "skipped_at": g.skipped_steps, "rollbacks": g.rollbacks}
