"""Sparse training: gradual magnitude pruning and RigL, with unstructured or 2:4 masks on the blocks' linear layers.

Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878 (gradual magnitude pruning, Eq. 1); Evci et al.
2020, "Rigging the Lottery", arXiv 1911.11134 (RigL, Algorithm 1). The schedules and mask rules are pure functions
in ``masks.py``, the 2:4 tensor-core swap for inference is ``semi_structured.py``; here are the config, the callback
that owns the masks during training (and applies RigL's drop/grow), and the technique.

How masks are kept: a tensor hook multiplies each masked weight's gradient by its mask during backward, so gradient
clipping, the all-reduce and the optimizer (momentum included) only see active weights; weights are multiplied by
their masks right after every optimizer step, so pruned weights stay exactly zero. At RigL update steps the same hook
first sums the dense gradient (all-reduced under DDP). Sharded parameters (FSDP, DeepSpeed ZeRO-3) are not supported.

Functional core: ``SparseTrainingCallback(method=..., sparsity=...)`` for the stock ``Trainer(callbacks=[...])``,
plus the pure functions ``cubic_sparsity``, ``magnitude_mask``, ``global_magnitude_masks``, ``n_m_mask``,
``erk_densities``, ``rigl_drop_fraction`` and ``rigl_update``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import TrainerCallback

from ...core.registry import register_technique
from ...core.technique import Env, Technique, TechniqueConfig
from ...errors import RecipeError
from .masks import (  # noqa: F401  (re-exported too: the functional cores are imported from the package)
    _input_last,
    cubic_sparsity,
    erk_densities,
    global_magnitude_masks,
    magnitude_mask,
    n_m_mask,
    rigl_drop_fraction,
    rigl_update,
    sparse_modules,
)
from .semi_structured import SemiStructured, to_semi_structured  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

END_FRACTION = 0.75  # end_step default: 75% of max_steps (RigL's T_end; pruning then fine-tunes the last quarter)


# ---- config -----------------------------------------------------------------------------------------------------
class SparseTrainingConfig(TechniqueConfig):
    name: Literal["sparse_training"] = "sparse_training"
    method: Literal["magnitude", "rigl"] = Field(
        "magnitude", description="magnitude: gradual pruning (Zhu & Gupta); rigl: constant-sparsity drop/grow."
    )
    sparsity: float = Field(0.5, ge=0, lt=1, description="Target fraction of zeros s_f (2:4 needs 0.5).")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="s_i of the cubic schedule (magnitude only).")
    pattern: Literal["unstructured", "2:4"] = Field(
        "unstructured", description="unstructured, or 2:4: keep 2 of every 4 consecutive weights along the input."
    )
    distribution: Literal["uniform", "erk", "global"] = Field(
        "uniform",
        description="Sparsity across layers: uniform (each layer at s), erk (Erdos-Renyi-Kernel), or global "
        "(one magnitude threshold over all layers; magnitude only).",
    )
    start_step: int = Field(
        0, ge=0, description="t0: the step after which pruning (or the 2:4 mask) starts; rigl is sparse from step 0."
    )
    end_step: int | None = Field(
        None,
        ge=1,
        description="magnitude: t0 + n*dt, where s_f is reached; rigl: T_end, the last mask update. "
        "null: 75% of the run's max_steps.",
    )
    update_every: int = Field(100, ge=1, description="dt / Delta T: steps between mask updates.")
    drop_fraction: float = Field(0.3, gt=0, le=1, description="RigL's alpha: fraction swapped at step 0 (cosine).")
    init_mask: Literal["random", "magnitude"] = Field(
        "random", description="RigL's initial mask: random (paper) or the largest weights (for pretrained models)."
    )
    include: tuple[str, ...] | None = Field(
        None,
        description="Regexes (re.search) of nn.Linear/Conv1D module names to sparsify; null: every one inside the "
        "transformer blocks (no embeddings, no LM head).",
    )
    exclude: tuple[str, ...] = Field((), description="Regexes of module names to leave dense.")
    seed: int = Field(0, description="Seed of RigL's random initial mask.")


# ---- the callback -----------------------------------------------------------------------------------------------
class SparseTrainingCallback(TrainerCallback):
    """Owns the masks: builds them at train begin (or takes those restored by ``load_state_dict``), masks gradients
    in backward, re-applies masks after each optimizer step, and updates them on schedule."""

    def __init__(self, config: SparseTrainingConfig | None = None, **kwargs: Any):
        self.config = config if config is not None else SparseTrainingConfig(**kwargs)
        self.modules: dict[str, nn.Module] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.end_step: int | None = self.config.end_step
        self.mask_updates = 0
        self.connections_changed = 0
        self._hooks: list[Any] = []
        self._collect = False
        self._dense: dict[str, torch.Tensor] = {}
        self._loaded: dict[str, Any] | None = None

    # -- set-up
    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        c = self.config
        modules = sparse_modules(model, c.include, c.exclude)
        if not modules:
            raise RecipeError("include", f"no nn.Linear/Conv1D module matches include={c.include} exclude={c.exclude}")
        if c.pattern == "2:4":
            for name, m in modules.items():
                if _input_last(m, m.weight).shape[-1] % 4:
                    raise RecipeError("pattern", f"2:4 needs input sizes divisible by 4; {name} has {m.weight.shape}")
        self.modules = modules
        return modules

    def bind(self, model: nn.Module, max_steps: int, step: int = 0) -> None:
        """Select the modules, resolve ``end_step``, create or restore the masks, hook the gradients, apply."""
        c = self.config
        self.select(model)
        for name, m in self.modules.items():
            w = m.weight
            if w.numel() == 0 or hasattr(w, "ds_numel") or type(w).__name__ == "DTensor":
                raise RuntimeError(f"sparse_training: {name}.weight is sharded (FSDP / ZeRO-3); not supported")
            if c.method == "rigl" and not w.requires_grad:
                raise RuntimeError(f"sparse_training: rigl needs gradients, but {name}.weight is frozen")
        if self.end_step is None:
            self.end_step = max(1, round(END_FRACTION * max_steps))
        if c.method == "magnitude" and c.pattern == "unstructured" and self.end_step <= c.start_step:
            raise ValueError(f"sparse_training: end_step ({self.end_step}) must be after start_step ({c.start_step})")
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        elif not self.masks and step > 0:  # resumed without saved masks (stock Trainer): the zeros are the masks
            logger.warning("sparse_training: no saved masks at step %d; rebuilt from the weights' zeros", step)
            self.masks = {n: m.weight.detach() != 0 for n, m in self.modules.items()}
        elif not self.masks:
            self.masks = self._initial_masks(step)
        self.remove_hooks()
        for name, m in self.modules.items():
            if m.weight.requires_grad:
                self._hooks.append(m.weight.register_hook(lambda g, n=name: self._grad_hook(n, g)))
        self.apply()

    def _initial_masks(self, step: int) -> dict[str, torch.Tensor]:
        c = self.config
        if c.method == "rigl":
            density = self._densities(1 - c.sparsity)
            gen = torch.Generator().manual_seed(c.seed)
            masks = {}
            for name, m in self.modules.items():
                w = m.weight
                if c.init_mask == "magnitude":
                    masks[name] = magnitude_mask(w.detach().abs(), 1 - density[name])
                else:  # exact count, random positions
                    keep = round(density[name] * w.numel())
                    flat = torch.zeros(w.numel(), dtype=torch.bool)
                    flat[torch.randperm(w.numel(), generator=gen)[:keep]] = True
                    masks[name] = flat.view_as(w).to(w.device)
            return masks
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in self.modules.items()}
        if step == c.start_step:
            self._prune(step)
        return self.masks

    def _densities(self, density: float) -> dict[str, float]:
        if self.config.distribution == "erk":
            return erk_densities({n: tuple(m.weight.shape) for n, m in self.modules.items()}, density)
        return dict.fromkeys(self.modules, density)

    # -- the masking itself
    def _grad_hook(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if self._collect:  # RigL update step: keep the dense gradient (summed over micro-batches)
            buf = self._dense.get(name)
            self._dense[name] = grad.detach().clone() if buf is None else buf.add_(grad)
        return grad * self.masks[name]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights (after every optimizer step)."""
        for name, m in self.modules.items():
            m.weight.mul_(self.masks[name])

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- mask updates
    def is_prune_step(self, t: int) -> bool:
        c = self.config
        if c.method != "magnitude":
            return False
        if c.pattern == "2:4":
            return t == c.start_step
        return c.start_step <= t <= self.end_step and ((t - c.start_step) % c.update_every == 0 or t == self.end_step)

    def is_rigl_step(self, t: int) -> bool:
        return self.config.method == "rigl" and t > 0 and t % self.config.update_every == 0 and t < self.end_step

    @torch.no_grad()
    def _prune(self, t: int) -> None:
        c = self.config
        if c.pattern == "2:4":
            for name, m in self.modules.items():
                self.masks[name] = _input_last(m, n_m_mask(_input_last(m, m.weight.abs())))
        else:
            s = cubic_sparsity(t, c.sparsity, c.initial_sparsity, c.start_step, self.end_step)
            # pruned weights score -1: a higher sparsity never brings one back, even past active zeros
            scores = {n: torch.where(self.masks[n], m.weight.abs().float(), -1.0) for n, m in self.modules.items()}
            if c.distribution == "global":
                self.masks = global_magnitude_masks(scores, s)
            else:
                density = self._densities(1 - s)
                self.masks = {n: magnitude_mask(scores[n], 1 - density[n]) for n in self.modules}
        self.mask_updates += 1

    @torch.no_grad()
    def _rigl_step(self, t: int, optimizer: Any) -> None:
        dense, self._dense, self._collect = self._dense, {}, False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for g in dense.values():  # every rank must pick the same connections
                torch.distributed.all_reduce(g)
        fraction = rigl_drop_fraction(t, self.config.drop_fraction, self.end_step)
        inner = getattr(optimizer, "optimizer", optimizer)
        for name, m in self.modules.items():
            if name not in dense:
                continue
            old = self.masks[name]
            new = rigl_update(m.weight, old, dense[name], fraction)
            grown = new & ~old
            m.weight[grown] = 0.0  # new connections start at zero...
            for v in (getattr(inner, "state", {}).get(m.weight) or {}).values():
                if torch.is_tensor(v) and v.shape == m.weight.shape:
                    v[grown] = 0  # ...with a fresh optimizer state
            if m.weight.grad is not None:
                m.weight.grad.mul_(new)
            self.connections_changed += int((new != old).sum())
            self.masks[name] = new
        self.mask_updates += 1

    # -- TrainerCallback events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.bind(model, state.max_steps, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._collect = self.is_rigl_step(state.global_step + 1)
        self._dense = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._collect:
            self._rigl_step(state.global_step + 1, optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply()

    def on_step_end(self, args, state, control, **kwargs):
        if self.is_prune_step(state.global_step):
            self._prune(state.global_step)
            self.apply()

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()

    # -- checkpointing and reporting
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.cpu() for n, m in self.masks.items()},
            "end_step": self.end_step,
            "mask_updates": self.mask_updates,
            "connections_changed": self.connections_changed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state
        if self._hooks:  # already training: restore now
            self._restore(state)
            self._loaded = None
            self.apply()

    def _restore(self, state: dict[str, Any]) -> None:
        if set(state["masks"]) != set(self.modules):
            raise ValueError("sparse_training: the checkpoint's masks are for other modules than this model's")
        self.masks = {n: state["masks"][n].to(self.modules[n].weight.device) for n in self.modules}
        self.end_step = state["end_step"]
        self.mask_updates = state["mask_updates"]
        self.connections_changed = state["connections_changed"]

    def report(self) -> dict[str, Any]:
        if not self.masks:
            return {}
        c = self.config
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        weight_zeros = sum(int((m.weight == 0).sum()) for m in self.modules.values())
        return {
            "method": c.method,
            "pattern": c.pattern,
            "distribution": c.distribution,
            "target_sparsity": 0.5 if c.pattern == "2:4" else c.sparsity,
            "sparsity_global": zeros / total,
            "weights_zero_fraction": weight_zeros / total,
            "sparsity_per_layer": {n: float((~m).float().mean()) for n, m in self.masks.items()},
            "params_masked": total,
            "end_step": self.end_step,
            "mask_updates": self.mask_updates,
            "connections_changed": self.connections_changed,
        }


# ---- the technique ----------------------------------------------------------------------------------------------
@register_technique
class SparseTrainingTechnique(Technique):
    """Adds ``SparseTrainingCallback``; its masks travel with every checkpoint (``state_dict``)."""

    name = "sparse_training"
    Config = SparseTrainingConfig
    survey_section = "Computation efficiency / Optimization (sparse training); hardware co-design (2:4 sparsity)"
    paper = (
        'Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878; '
        'Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners", arXiv 1911.11134'
    )

    config: SparseTrainingConfig

    def __init__(self, config: SparseTrainingConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.callback = SparseTrainingCallback(self.config)

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        if c.pattern == "2:4":
            if c.method != "magnitude":
                raise RecipeError("pattern", "2:4 works with method: magnitude only (allowed with rigl: unstructured)")
            if c.sparsity != 0.5 or c.distribution != "uniform":
                raise RecipeError("sparsity", "2:4 keeps 2 of every 4 weights: sparsity 0.5, distribution uniform")
        if c.method == "rigl" and c.distribution == "global":
            raise RecipeError("distribution", "rigl allows uniform or erk (global is for method: magnitude)")
        if c.initial_sparsity > c.sparsity:
            raise RecipeError("initial_sparsity", f"must be <= sparsity ({c.sparsity})")
        max_steps = (getattr(recipe, "training", None) or {}).get("max_steps", -1)
        if c.end_step is not None and c.method == "magnitude" and c.pattern == "unstructured":
            if c.end_step <= c.start_step:
                raise RecipeError("end_step", f"must be after start_step ({c.start_step})")
            if max_steps > 0 and c.end_step > max_steps:
                raise RecipeError("end_step", f"is past training.max_steps ({max_steps}): s_f would never be reached")
        if max_steps > 0 and c.start_step >= max_steps:
            raise RecipeError("start_step", f"must be before training.max_steps ({max_steps})")
        for field in ("include", "exclude"):
            for pattern in getattr(c, field) or ():
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise RecipeError(field, f"{pattern!r} is not a valid regular expression ({e})") from None

    def on_model(self, model: nn.Module) -> nn.Module:
        self.callback.select(model)  # an empty selection or a 2:4 shape problem fails before training
        return model

    def callbacks(self) -> list[TrainerCallback]:
        return [self.callback]

    def state_dict(self) -> dict[str, Any]:
        return self.callback.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.callback.load_state_dict(state)

    def report(self) -> dict[str, Any]:
        return self.callback.report()
