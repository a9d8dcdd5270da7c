"""Progressive stacking: train a shallow model, then grow its depth by copying the trained layers on top.

Gong et al., "Efficient Training of BERT by Progressively Stacking", ICML 2019 (PMLR 97:2337-2346; the paper has no
arXiv version; survey arXiv 2302.01107, "Incremental learning"). Stacking rule (the paper's Algorithm 1): an
L-layer stack W_0..W_{L-1} becomes a 2L-layer stack with

    W'_i = W'_{i+L} = W_i        (i = 0 .. L-1)

Depth schedule: d_0 = start_layers, d_{j+1} = min(2 d_j, N) up to the model's full depth N (BERT-base in the paper:
3 -> 6 -> 12). When N is not start * 2^m the last growth copies only layers 0 .. N-d_j-1 (still i -> i+L).

What growing means for the run:
- the model: blocks are deep-copied into the stack found by ``layer_stacks``; per-layer indices (``layer_idx`` used by
  caches, GPT-2's inverse-layer-index attention scaling) and ``config.num_hidden_layers`` / ``config.layer_types``
  follow, so a saved grown model is a plain HF model of that depth;
- the optimizer: the Trainer's optimizer object is kept, so the lr scheduler bound to it continues where it was. Its
  param groups are rebuilt for the grown model: every copy joins its source's group (same weight decay), listed in
  ``model.named_parameters()`` order, exactly as a fresh Trainer optimizer on the grown model lists them (so a
  checkpoint taken after growth loads into an optimizer built on the grown model). A copy's optimizer state is a clone
  of its source's (``optimizer_state: copy``) or starts empty (``reset``; Adam's moments and step from zero).
- resume: the stage is the technique state. ``EffTrainer.train`` loads technique state before ``Trainer.train`` loads
  the checkpoint's weights, so the model is grown to the checkpoint's depth first. With the stock Trainer call
  ``ProgressiveStacking.prepare_resume(checkpoint)`` before ``trainer.train(resume_from_checkpoint=checkpoint)``.

Functional core for the stock Trainer: ``stacker = ProgressiveStacking(model, start_layers=1, grow_at_steps=[...])``
(truncates the model), then ``Trainer(..., callbacks=[stacker.callback()])``. Lower level: ``truncate_layers``,
``stack_layers``, ``extend_optimizer``. Single process only: growing under DDP/ZeRO/FSDP would need re-wrapping.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn
from transformers import TrainerCallback

from ..core.layers import base_model, layer_stacks
from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig, refuse_pretrained_weights
from ..errors import RecipeError
from ..runtime.flop_count import uniform_blocks

logger = logging.getLogger(__name__)

STATE_FILE = "progressive_stacking.json"  # in each checkpoint folder, for the stock Trainer's prepare_resume
DEFAULT_START_FRACTION = 0.25


def _stack(model: nn.Module, path: str = "model.name_or_path") -> nn.ModuleList:
    stacks = layer_stacks(model, path)
    if len(stacks) != 1:
        raise RecipeError(
            path, f"progressive stacking grows a single block stack; {type(base_model(model)).__name__} has "
            f"{len(stacks)} ({', '.join(stacks)})"
        )  # fmt: skip
    return next(iter(stacks.values()))


def _configs(model: nn.Module) -> list[Any]:
    found: dict[int, Any] = {}
    for m in (model, getattr(model, "module", None), base_model(model)):
        cfg = getattr(m, "config", None)
        if cfg is not None:
            found[id(cfg)] = cfg
    return list(found.values())


def _set_depth(model: nn.Module, stack: nn.ModuleList, sources: list[int]) -> None:
    """Make layer indices and the config agree with the stack; ``sources[j]`` = old index of the layer now at j."""
    for j, block in enumerate(stack):
        for m in block.modules():
            old = getattr(m, "layer_idx", None)
            if isinstance(old, int) and old != j:
                if getattr(m, "scale_attn_by_inverse_layer_idx", False):  # GPT-2 precomputes 1/(layer_idx+1)
                    m.scaling *= (old + 1) / (j + 1)
                m.layer_idx = j
    for cfg in _configs(model):
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list):
            cfg.layer_types = [types[i] for i in sources]
        cfg.num_hidden_layers = len(stack)


def truncate_layers(model: nn.Module, depth: int) -> int:
    """Keep the bottom ``depth`` blocks; returns the depth before."""
    before = len(stack := _stack(model))
    if not 1 <= depth <= before:
        raise ValueError(f"depth must be in 1..{before}, got {depth}")
    del stack[depth:]
    _set_depth(model, stack, list(range(depth)))
    return before


def check_copyable(stack: nn.ModuleList) -> None:
    """A block patched on the instance (another technique's wrapper) would be copied with a closure over the source
    block: refuse rather than train a silently wrong model."""
    for i, block in enumerate(stack):
        for name, m in block.named_modules():
            if "forward" in vars(m):
                where = f"block {i}" + (f" ({name})" if name else "")
                raise RecipeError("", f"progressive stacking cannot copy {where}: its forward is patched by another "
                                  "technique; leave that technique out")  # fmt: skip


def stack_layers(model: nn.Module, depth: int | None = None) -> dict[nn.Parameter, nn.Parameter]:
    """Grow an L-block stack to ``depth`` (default 2L, at most 2L) by copying block i to i+L.

    Returns ``{new parameter: its source parameter}`` for ``extend_optimizer``."""
    stack = _stack(model)
    check_copyable(stack)
    n = len(stack)
    depth = 2 * n if depth is None else depth
    if not n < depth <= 2 * n:
        raise ValueError(f"stacking grows {n} blocks to {n + 1}..{2 * n}, got {depth}")
    sources: dict[nn.Parameter, nn.Parameter] = {}
    for i in range(depth - n):
        new = copy.deepcopy(stack[i])
        for src, dst in zip(stack[i].parameters(), new.parameters()):
            dst.grad = None
            sources[dst] = src
        stack.append(new)
    _set_depth(model, stack, list(range(n)) + list(range(depth - n)))
    return sources


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}


def extend_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, sources: dict[nn.Parameter, nn.Parameter], copy_state: bool
) -> int:
    """Add each new parameter to its source's param group, in place; returns how many were added.

    Groups are re-listed in ``model.parameters()`` order: the order a fresh Trainer optimizer would use, which is what
    makes the optimizer state saved after growth load into one built on the grown model."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    added = 0
    for new, src in sources.items():
        group = group_of.get(src)
        if group is None:  # the source is not optimized (frozen): neither is its copy
            continue
        group["params"].append(new)
        added += 1
        if copy_state and src in opt.state and opt.state[src]:
            opt.state[new] = _clone_state(opt.state[src])
    order = {p: i for i, p in enumerate(model.parameters())}
    for group in opt.param_groups:
        group["params"].sort(key=lambda p: order.get(p, len(order)))  # stable: anything outside the model stays last
    return added


def stage_depths(start: int, full: int) -> list[int]:
    depths = [start]
    while depths[-1] < full:
        depths.append(min(2 * depths[-1], full))
    return depths


def default_grow_fractions(n_growths: int) -> list[float]:
    """The shallow stages share the first half of training equally; the full-depth model trains the second half."""
    return [0.5 * (j + 1) / n_growths for j in range(n_growths)]


class ProgressiveStacking:
    """The schedule and its state; ``callback()`` runs it inside a (stock or Eff) Trainer. Truncates ``model``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        start_layers: int | None = None,
        start_fraction: float | None = None,
        grow_at_steps: list[int] | None = None,
        grow_at_fractions: list[float] | None = None,
        optimizer_state: Literal["copy", "reset"] = "copy",
        error_path: str = "",
    ):
        prefix = f"{error_path}." if error_path else ""
        self.model = model
        self.full_depth = len(_stack(model))
        if start_layers is None:
            start_layers = max(1, round(self.full_depth * (start_fraction or DEFAULT_START_FRACTION)))
        if not 1 <= start_layers < self.full_depth:
            raise RecipeError(
                f"{prefix}start_layers", f"must be in 1..{self.full_depth - 1} for a {self.full_depth}-layer model"
            )
        self.depths = stage_depths(start_layers, self.full_depth)
        growths = len(self.depths) - 1
        for name, given in (("grow_at_steps", grow_at_steps), ("grow_at_fractions", grow_at_fractions)):
            if given is not None and len(given) != growths:
                raise RecipeError(
                    f"{prefix}{name}", f"needs {growths} values, one per growth of the depths {self.depths}"
                )
        self.grow_at_steps = list(grow_at_steps) if grow_at_steps is not None else None
        self.grow_at_fractions = list(grow_at_fractions or default_grow_fractions(growths))
        self.copy_state = optimizer_state == "copy"
        self.stage = 0
        self.history: list[dict[str, int]] = [{"stage": 0, "depth": start_layers, "step": 0}]
        self.max_steps: int | None = None
        truncate_layers(model, start_layers)

    # ---- schedule ---------------------------------------------------------------------------------------------
    def resolved_steps(self) -> list[int]:
        """The optimizer step after which each growth happens."""
        if self.grow_at_steps is not None:
            return self.grow_at_steps
        if self.max_steps is None:
            raise RuntimeError("grow_at_fractions needs the run's max_steps (set at train begin)")
        return [max(1, round(f * self.max_steps)) for f in self.grow_at_fractions]

    def grow(self, optimizer: torch.optim.Optimizer | None = None, step: int = 0) -> None:
        """Advance one stage: stack layers, and add the copies to ``optimizer`` when given."""
        if self.stage + 1 >= len(self.depths):
            raise RuntimeError(f"already at full depth {self.full_depth}")
        sources = stack_layers(self.model, self.depths[self.stage + 1])
        if optimizer is not None:
            extend_optimizer(optimizer, self.model, sources, self.copy_state)
        self.stage += 1
        self.history.append({"stage": self.stage, "depth": self.depths[self.stage], "step": int(step)})
        logger.info("progressive stacking: step %d, depth %d", step, self.depths[self.stage])

    def maybe_grow(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        steps = self.resolved_steps()
        while self.stage < len(steps) and steps[self.stage] <= step:
            self.grow(optimizer, step)

    # ---- resume -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Grow to the saved stage (call before the checkpoint's weights are loaded)."""
        target = int(state["stage"])
        if target < self.stage:
            raise ValueError(f"the model is at stage {self.stage}, past the checkpoint's stage {target}")
        while self.stage < target:
            self.grow(optimizer, state["history"][self.stage + 1]["step"])
        self.history = [dict(h) for h in state["history"]]

    def prepare_resume(self, checkpoint: str) -> None:
        """Stock Trainer: grow to the checkpoint's stage before ``trainer.train(resume_from_checkpoint=...)``."""
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            self.load_state_dict(json.load(f))

    def layer_step_fraction(self, total_steps: int) -> float:
        """Block-steps trained / (full depth x steps): the share of the baseline's layer compute spent."""
        if total_steps <= 0:
            return 1.0
        work = 0
        for h, nxt in zip(self.history, self.history[1:] + [{"step": total_steps}]):
            work += h["depth"] * max(0, min(nxt["step"], total_steps) - h["step"])
        return work / (self.full_depth * total_steps)

    def callback(self) -> ProgressiveStackingCallback:
        return ProgressiveStackingCallback(self)


class ProgressiveStackingCallback(TrainerCallback):
    """Grows the model after the optimizer step that ends each stage; writes the stage into every checkpoint."""

    def __init__(self, stacker: ProgressiveStacking):
        self.stacker = stacker

    def on_train_begin(self, args, state, control, **kwargs):
        self.stacker.max_steps = state.max_steps
        steps = self.stacker.resolved_steps()
        if steps and steps[-1] > state.max_steps:
            logger.warning("progressive stacking: growth steps %s go past max_steps %d; the model ends shallower "
                           "than its full depth", steps, state.max_steps)  # fmt: skip
        self.stacker.maybe_grow(state.global_step, kwargs.get("optimizer"))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.stacker.maybe_grow(state.global_step, kwargs.get("optimizer"))
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.stacker.state_dict(), f)
        return control


class ProgressiveStackingConfig(TechniqueConfig):
    name: Literal["progressive_stacking"] = "progressive_stacking"
    start_layers: PositiveInt | None = Field(
        None, description="Depth of the first stage; default start_fraction of the model's depth."
    )
    start_fraction: float | None = Field(
        None, gt=0, lt=1, description="First stage's depth as a fraction of the full depth (default 0.25)."
    )
    grow_at_steps: list[PositiveInt] | None = Field(
        None, description="Optimizer steps after which the depth doubles, one per growth, increasing."
    )
    grow_at_fractions: list[float] | None = Field(
        None,
        description="Growth points as fractions of max_steps in (0, 1), increasing; default: the shallow stages "
        "share the first half of training equally.",
    )
    optimizer_state: Literal["copy", "reset"] = Field(
        "copy", description="A copied layer's optimizer state: a clone of its source's (copy) or fresh (reset)."
    )


@register_technique
class ProgressiveStackingTechnique(Technique):
    """Truncates the model in ``on_model``, grows it from a callback, restores the stage before weights load."""

    name = "progressive_stacking"
    Config = ProgressiveStackingConfig
    survey_section = "Computation efficiency / Incremental learning"
    paper = (
        'Gong et al. 2019, "Efficient Training of BERT by Progressively Stacking", ICML 2019, PMLR 97:2337-2346 '
        "(no arXiv version; survey arXiv 2302.01107)"
    )
    # Both would have to follow the blocks that stacking adds and re-indexes; not supported together.
    conflicts = frozenset({"layer_dropping", "layer_freezing"})

    config: ProgressiveStackingConfig

    def __init__(self, config: ProgressiveStackingConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.stacker: ProgressiveStacking | None = None
        self.trainer: Any = None
        self._path = ""

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        names = recipe.technique_names()
        self._path = f"techniques[{names.index(self.name)}]" if self.name in names else ""
        if c.start_layers is not None and c.start_fraction is not None:
            raise RecipeError("start_layers", "give start_layers or start_fraction, not both")
        if c.grow_at_steps is not None and c.grow_at_fractions is not None:
            raise RecipeError("grow_at_steps", "give grow_at_steps or grow_at_fractions, not both")
        for field in ("grow_at_steps", "grow_at_fractions"):
            values = getattr(c, field)
            if values is not None and any(b <= a for a, b in zip(values, values[1:])):
                raise RecipeError(field, f"must be strictly increasing, got {values}")
        if c.grow_at_fractions is not None and not all(0 < f < 1 for f in c.grow_at_fractions):
            raise RecipeError("grow_at_fractions", f"each must be in (0, 1), got {c.grow_at_fractions}")
        refuse_pretrained_weights(recipe, self.name, does="truncates the model to its first blocks")
        if env.world_size > 1:
            raise RecipeError("", f"runs single-process only (world_size is {env.world_size}): growing the model "
                              "under DDP/ZeRO/FSDP would need re-wrapping it; launch one process")  # fmt: skip

    def on_model(self, model: nn.Module) -> nn.Module:
        c = self.config
        self.stacker = ProgressiveStacking(
            model,
            start_layers=c.start_layers,
            start_fraction=c.start_fraction,
            grow_at_steps=c.grow_at_steps,
            grow_at_fractions=c.grow_at_fractions,
            optimizer_state=c.optimizer_state,
            error_path=self._path,
        )
        return model

    def _require_stacker(self) -> ProgressiveStacking:
        if self.stacker is None:
            raise RuntimeError("progressive_stacking: on_model(model) must run before training")
        return self.stacker

    def callbacks(self) -> list[TrainerCallback]:
        return [self._require_stacker().callback()]

    def on_trainer(self, trainer: Any) -> None:
        self.trainer = trainer
        check_copyable(_stack(trainer.model))
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or trainer.args.world_size > 1:
            raise RecipeError(self._path, "runs single-process without DeepSpeed/FSDP (the grown model would need "
                              "re-wrapping)")  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return self._require_stacker().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # EffTrainer calls this before Trainer.train() loads the checkpoint's weights: grow first, then they fit.
        self._require_stacker().load_state_dict(state, getattr(self.trainer, "optimizer", None))

    def report(self) -> dict[str, Any]:
        s = self._require_stacker()
        return {"depths": s.depths, "stages": s.history,
                "grow_at_steps": s.resolved_steps() if (s.grow_at_steps or s.max_steps) else None,
                "layer_step_fraction": s.layer_step_fraction(s.max_steps) if s.max_steps else None}  # fmt: skip

    def compute_fraction(self, model: nn.Module, steps: int, seq_len: int) -> Any:  # blocks work once stacked
        s, stack = self._require_stacker(), _stack(model)
        return uniform_blocks(stack, s.layer_step_fraction(steps) * s.full_depth / len(stack), "progressive stacking")
