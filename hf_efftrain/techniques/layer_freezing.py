"""Progressive layer freezing: freeze transformer blocks from the bottom up on a schedule, so that backward stops
at the lowest block still training.

Brock et al., "FreezeOut: Accelerate Training by Progressively Freezing Layers", arXiv 1706.04983 (layer i stops
training at t_i, with t_i growing linearly with depth); Liu et al., "AutoFreeze: Automatically Freezing Model Blocks
to Accelerate Fine-tuning", arXiv 2102.01386 (freezes whole blocks from the bottom, embeddings with the first).
With L blocks, final fraction f, start step s and end step e, at optimizer step t

    n(t) = floor(f * L * clamp((t - s) / (e - s), 0, 1))        (e == s: n(t) = floor(f * L) once t >= s)

blocks 0 .. n(t)-1 are frozen: ``requires_grad`` False, their gradients dropped, so the optimizer skips them (their
weights stay as they were) and, once the embeddings below are frozen too (``freeze_embeddings``, when n(t) >= 1),
autograd never enters them: no backward compute below block n(t). So block k (k = 1 .. floor(fL)) freezes at
t_k = s + (e - s) * k / (f L): FreezeOut's linear t_i schedule in whole blocks. FreezeOut also anneals each layer's
learning rate to zero before t_i; that is not done here (the Trainer's schedule applies to all trainable layers).

An input embedding tied to the output head (GPT-2) keeps training through the head; its input-side output is
detached instead (an instance patch, undone at train end), so backward still stops at block n(t).

Freezing follows the Trainer's optimizer steps: the optimizer is built first (with every parameter, so checkpoints
taken before and after freezing hold the same groups), then the callback freezes at train begin and at each step
begin, and restores every ``requires_grad`` flag at train end. Functional core for the stock Trainer:
``freezer = LayerFreezer(model, final_fraction=0.5, start_step=100, end_step=400)``,
``Trainer(..., callbacks=[freezer.callback()])``; or ``freezer.freeze(n)`` / ``freezer.undo()`` by hand.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import Field, NonNegativeInt
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from ..core.layers import base_model, layer_stacks
from ..core.patching import Patch, patch_attr
from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig
from ..errors import RecipeError

logger = logging.getLogger(__name__)

# base-model class name -> dotted paths of everything that runs below the first block
_EMBEDDINGS: dict[str, tuple[str, ...]] = {}


def register_embedding_policy(base_model_class: str, paths: tuple[str, ...]) -> None:
    _EMBEDDINGS[base_model_class] = tuple(paths)


for _name in ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model", "GemmaModel", "Gemma2Model", "PhiModel",
              "Phi3Model", "OlmoModel"):  # fmt: skip
    register_embedding_policy(_name, ("embed_tokens",))
register_embedding_policy("GPTNeoXModel", ("embed_in",))
register_embedding_policy("GPT2Model", ("wte", "wpe"))
for _name in ("BertModel", "RobertaModel", "XLMRobertaModel"):
    register_embedding_policy(_name, ("embeddings",))
register_embedding_policy("ElectraModel", ("embeddings", "embeddings_project"))


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The modules below the first block: the registered policy, else the input embedding."""
    body = base_model(model)
    for cls in type(body).__mro__:
        if cls.__name__ in _EMBEDDINGS:
            return [m for p in _EMBEDDINGS[cls.__name__] if (m := getattr(body, p, None)) is not None]
    return [model.get_input_embeddings()]


def frozen_count(step: int, num_layers: int, final_fraction: float, start: int, end: int) -> int:
    """n(t): how many bottom blocks are frozen at optimizer step ``step``."""
    if step < start:
        return 0
    progress = 1.0 if end <= start else min(1.0, (step - start) / (end - start))
    return min(num_layers, math.floor(final_fraction * num_layers * progress + 1e-9))


class LayerFreezer:
    """Freezes the bottom blocks (and the embeddings below them) of a single-stack model; ``undo`` restores."""

    def __init__(
        self,
        model: nn.Module,
        *,
        final_fraction: float = 0.5,
        start_step: int | None = None,
        end_step: int | None = None,
        start_fraction: float | None = None,
        end_fraction: float | None = None,
        freeze_embeddings: bool = True,
    ):
        stacks = layer_stacks(model)
        if len(stacks) != 1:
            raise RecipeError("model.name_or_path", f"layer freezing needs a single block stack, got {list(stacks)}")
        self.model = model
        self.blocks = next(iter(stacks.values()))
        self.final_fraction = final_fraction
        self.start_step, self.end_step = start_step, end_step
        self.start_fraction = 0.25 if start_step is None and start_fraction is None else start_fraction
        self.end_fraction = 0.75 if end_step is None and end_fraction is None else end_fraction
        self.freeze_embeddings = freeze_embeddings
        self.embeddings = embedding_modules(model)
        # An input embedding tied to the output head: its weight keeps training, its lookup output is detached.
        self._tied_weight = getattr(model.get_output_embeddings(), "weight", None)
        self._tied = [
            sm
            for m in self.embeddings
            for sm in m.modules()
            if self._tied_weight is not None and getattr(sm, "weight", None) is self._tied_weight
        ]
        self._original = {p: p.requires_grad for p in model.parameters()}  # PEFT etc.: never unfreeze those
        self._detach: list[Patch] = []
        self.max_steps: int | None = None
        self.frozen = 0
        if math.floor(final_fraction * len(self.blocks) + 1e-9) == 0:
            logger.warning(
                "layer freezing: final_fraction %s of %d blocks freezes none", final_fraction, len(self.blocks)
            )
        self.history: list[dict[str, int]] = []

    def steps(self) -> tuple[int, int]:
        """(start, end) optimizer steps of the schedule."""

        def resolve(step: int | None, fraction: float | None) -> int:
            if step is not None:
                return step
            if self.max_steps is None:
                raise RuntimeError("fractions of training need max_steps (set at train begin)")
            return round(fraction * self.max_steps)

        return resolve(self.start_step, self.start_fraction), resolve(self.end_step, self.end_fraction)

    def count_at(self, step: int) -> int:
        start, end = self.steps()
        return frozen_count(step, len(self.blocks), self.final_fraction, start, end)

    def set_step(self, step: int) -> int:
        n = self.count_at(step)
        if n != self.frozen:
            self.freeze(n)
            self.history.append({"step": int(step), "frozen_layers": n})
            logger.info("layer freezing: step %d, %d of %d blocks frozen", step, n, len(self.blocks))
        return n

    def _set(self, module: nn.Module, trainable: bool) -> None:
        for p in module.parameters():
            if p is self._tied_weight:
                continue
            p.requires_grad_(trainable and self._original.get(p, True))
            if not p.requires_grad:
                p.grad = None

    def freeze(self, n: int) -> None:
        """Freeze blocks 0..n-1 (and the embeddings when n >= 1); unfreeze the rest."""
        for i, block in enumerate(self.blocks):
            self._set(block, i >= n)
        below = n >= 1 and self.freeze_embeddings
        for m in self.embeddings:
            self._set(m, not below)
        if below and not self._detach:
            self._detach = [patch_attr(m, "forward", _detached(m.forward)) for m in self._tied]
        elif not below:
            self._undo_detach()
        self.frozen = n

    def _undo_detach(self) -> None:
        while self._detach:
            self._detach.pop().undo()

    def undo(self) -> None:
        for p, flag in self._original.items():
            p.requires_grad_(flag)
        self._undo_detach()
        self.frozen = 0

    def layer_step_fraction(self, total_steps: int) -> float | None:
        """Share of block-steps that still ran backward (1.0 = no freezing)."""
        if not total_steps:
            return None
        trained, n, last = 0, 0, 0
        for h in self.history + [{"step": total_steps, "frozen_layers": 0}]:
            step = min(h["step"], total_steps)
            trained += (len(self.blocks) - n) * max(0, step - last)
            n, last = h["frozen_layers"], step
        return trained / (len(self.blocks) * total_steps)

    def callback(self) -> LayerFreezingCallback:
        return LayerFreezingCallback(self)


def _detached(original: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs).detach()

    return forward


class LayerFreezingCallback(TrainerCallback):
    """Applies n(t) at train begin (after the optimizer exists) and at each step begin; restores at train end."""

    def __init__(self, freezer: LayerFreezer):
        self.freezer = freezer

    def on_train_begin(self, args, state, control, **kwargs):
        self.freezer.max_steps = state.max_steps
        self.freezer.set_step(state.global_step)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.freezer.set_step(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.freezer.undo()
        return control


class LayerFreezingConfig(TechniqueConfig):
    name: Literal["layer_freezing"] = "layer_freezing"
    final_fraction: float = Field(0.5, gt=0, le=1, description="Fraction of the blocks frozen at the end of the ramp.")
    start_step: NonNegativeInt | None = Field(None, description="Optimizer step where freezing starts.")
    end_step: NonNegativeInt | None = Field(None, description="Step where final_fraction is reached (>= start).")
    start_fraction: float | None = Field(
        None, ge=0, le=1, description="start_step as a fraction of max_steps (default 0.25 when no start_step)."
    )
    end_fraction: float | None = Field(
        None, ge=0, le=1, description="end_step as a fraction of max_steps (default 0.75 when no end_step)."
    )
    freeze_embeddings: bool = Field(
        True, description="Freeze the embeddings below the first block once it freezes (tied ones: detached)."
    )


@register_technique
class LayerFreezingTechnique(Technique):
    """Checks the architecture in ``on_model``; a callback follows the schedule."""

    name = "layer_freezing"
    Config = LayerFreezingConfig
    survey_section = "Computation efficiency / Incremental learning"
    paper = (
        'Brock et al. 2017, "FreezeOut: Accelerate Training by Progressively Freezing Layers", arXiv 1706.04983; '
        'Liu et al. 2021, "AutoFreeze", arXiv 2102.01386'
    )

    config: LayerFreezingConfig

    def __init__(self, config: LayerFreezingConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.freezer: LayerFreezer | None = None

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        if c.start_step is not None and c.start_fraction is not None:
            raise RecipeError("start_step", "give start_step or start_fraction, not both")
        if c.end_step is not None and c.end_fraction is not None:
            raise RecipeError("end_step", "give end_step or end_fraction, not both")
        if c.start_step is not None and c.end_step is not None and c.end_step < c.start_step:
            raise RecipeError("end_step", f"must be >= start_step ({c.start_step}), got {c.end_step}")
        if c.start_fraction is not None and c.end_fraction is not None and c.end_fraction < c.start_fraction:
            raise RecipeError("end_fraction", f"must be >= start_fraction ({c.start_fraction}), got {c.end_fraction}")
        if recipe.training.get("ddp_find_unused_parameters") is False:
            raise RecipeError("", "needs training.ddp_find_unused_parameters true (frozen blocks get no gradient)")

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        args.ddp_find_unused_parameters = True  # DDP's reducer must not wait for the frozen blocks' gradients
        return args

    def on_model(self, model: nn.Module) -> nn.Module:
        c = self.config
        self.freezer = LayerFreezer(
            model,
            final_fraction=c.final_fraction,
            start_step=c.start_step,
            end_step=c.end_step,
            start_fraction=c.start_fraction,
            end_fraction=c.end_fraction,
            freeze_embeddings=c.freeze_embeddings,
        )
        return model

    def on_trainer(self, trainer: Any) -> None:
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise RecipeError(
                "", "not supported with DeepSpeed or FSDP: they build their flat parameter partitions from "
                "requires_grad once, and do not follow blocks frozen later"
            )  # fmt: skip

    def callbacks(self) -> list[TrainerCallback]:
        if self.freezer is None:
            raise RuntimeError("layer_freezing: on_model(model) must run before training")
        return [self.freezer.callback()]

    def report(self) -> dict[str, Any]:
        f = self.freezer
        if f is None or f.max_steps is None:
            return {}
        start, end = f.steps()
        return {"start_step": start, "end_step": end, "frozen_history": f.history,
                "backward_layer_step_fraction": f.layer_step_fraction(f.max_steps)}  # fmt: skip

    def compute_fraction(self, model: nn.Module, steps: int, seq_len: int) -> Any:
        """Block k gets weight gradients in the steps where fewer than k + 1 blocks are frozen (``history``), and
        input / attention gradients then too, or in every step when the embeddings below it keep training."""
        from ..runtime.flop_count import ComputeFraction, Parts

        f = self.freezer
        if f is None or steps <= 0:
            return None
        trained, n, last = [0] * len(f.blocks), 0, 0
        for h in f.history + [{"step": steps, "frozen_layers": 0}]:  # as layer_step_fraction walks it
            step = min(h["step"], steps)
            trained[n:] = [t + max(0, step - last) for t in trained[n:]]
            n, last = h["frozen_layers"], step
        shares = [t / steps for t in trained]
        # Backward stops below the frozen blocks only when the embeddings under them freeze too.
        parts = [Parts(1.0, b, w, 1.0, b) for w in shares for b in [w if f.freeze_embeddings else 1.0]]
        note = f"layer freezing: blocks trained in {sum(shares) / len(shares):.4g} of the block-steps (weight grads)"
        return ComputeFraction(note, dict(zip(f.blocks, parts)))
