"""divergence_guard: non-finite steps are skipped (weights and optimizer state untouched), counted, and after
max_consecutive in a row the run rolls back to an earlier checkpoint with a lower learning rate, or stops."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_efftrain import Recipe
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.registry import _REGISTRY, register_technique
from hf_efftrain.core.technique import Technique, TechniqueConfig
from hf_efftrain.errors import RecipeError
from hf_efftrain.runtime.checkpoint import Diverged
from hf_efftrain.techniques.divergence_guard import DivergenceGuard


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class Recorder(TrainerCallback):
    """Weights after every step, keyed by the step number (global_step after the update)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = snapshot(model)


class Poison(TrainerCallback):
    """Makes the loss (via the lm_head output) or only the gradients non-finite at the given 1-based steps."""

    def __init__(self, model, steps: set[int], where: Literal["loss", "grad"]):
        self.steps, self.current = steps, 0
        head = model.get_output_embeddings()
        if where == "loss":
            head.register_forward_hook(lambda m, i, out: out * float("nan") if self.current in self.steps else out)
        else:  # the loss stays finite, one gradient becomes inf
            head.weight.register_hook(lambda g: g * float("inf") if self.current in self.steps else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step + 1


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_with_the_stock_trainer(tiny, where):
    def run(guarded: bool):
        model = tiny.model()
        recorder = Recorder()
        trainer = Trainer(model=model, args=tiny.args(max_steps=5), train_dataset=tiny.rows())
        trainer.add_callback(Poison(model, {3}, where))
        guard = None
        if guarded:
            guard = DivergenceGuard(max_consecutive=3, on_diverge="stop")
            guard.attach(trainer)
        trainer.add_callback(recorder)
        trainer.train()
        return trainer, guard, recorder.weights

    trainer, guard, w = run(guarded=True)
    assert guard.skipped_steps == [3]
    assert same(w[3], w[2])  # the poisoned step left the weights alone
    assert not same(w[2], w[1]) and not same(w[4], w[3])  # the others trained
    assert all(torch.isfinite(v).all() for v in w[5].values())
    state = next(iter(trainer.optimizer.state.values()))
    assert int(state["step"]) == 4  # AdamW saw 4 of the 5 steps: its moments never took the bad gradient

    _, _, unguarded = run(guarded=False)
    assert same(unguarded[2], w[2])  # the same run up to the poison ...
    assert not all(torch.isfinite(v).all() for v in unguarded[5].values())  # ... which breaks it without the guard


def test_detach_undoes_the_trainer_patches(tiny):
    trainer = Trainer(model=tiny.model(), args=tiny.args(), train_dataset=tiny.rows())
    guard = DivergenceGuard()
    guard.attach(trainer)
    assert "training_step" in vars(trainer) and "_get_grad_norm" in vars(trainer)
    guard.detach()
    assert "training_step" not in vars(trainer) and "_get_grad_norm" not in vars(trainer)


# ---- through the recipe: a test technique poisons the loss at chosen steps -----------------------------------------
class PoisonConfig(TechniqueConfig):
    name: Literal["test_divergence_guard"] = "test_divergence_guard"
    steps: list[int] = []


class PoisonTechnique(Technique):
    name = "test_divergence_guard"  # == this module's name, as the registry requires
    Config = PoisonConfig
    survey_section = "test"
    paper = "test"

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.step = 0
        self.recorder = Recorder()

    def on_batch(self, batch, step):
        self.step = step + 1  # the step this batch is for
        return batch

    def loss(self, model, batch, compute_loss):
        return compute_loss(model, batch) * float("nan") if self.step in self.config.steps else None

    def callbacks(self):
        return [self.recorder]


@pytest.fixture
def poison_technique():
    register_technique(PoisonTechnique)
    yield
    _REGISTRY.pop("test_divergence_guard", None)


def guarded_recipe(tiny_recipe, poison_steps, **guard):
    return Recipe.parse(
        tiny_recipe(
            techniques=[
                {"name": "divergence_guard", **guard},
                {"name": "test_divergence_guard", "steps": poison_steps},
            ],
            training={"max_steps": 10, "save_strategy": "steps", "save_steps": 2},
        )
    )


def test_consecutive_nonfinite_steps_roll_back_with_a_lower_lr(tiny_recipe, tmp_path, poison_technique):
    built = build(guarded_recipe(tiny_recipe, [6, 7], max_consecutive=2, lr_factor=0.5))
    built.trainer.train()
    guard_t, poison = built.techniques
    report = guard_t.report()
    # 6 and 7 skipped; the weights after step 5 produced them, so the rollback goes to checkpoint-4 (not -6)
    assert report["skipped_steps"] == 2 and report["skipped_at"] == [6, 7]
    assert [r["checkpoint"] for r in report["rollbacks"]] == [str(tmp_path / "run" / "checkpoint-4")]
    w = poison.recorder.weights
    assert same(w[7], w[4]) and not same(w[5], w[4])  # after step 7: checkpoint-4's weights
    lrs = {e["step"]: e["learning_rate"] for e in built.trainer.state.log_history if "learning_rate" in e}
    assert lrs[5] == pytest.approx(3e-3) and all(lrs[s] == pytest.approx(1.5e-3) for s in (8, 9, 10))
    assert all(torch.isfinite(p).all() for p in built.model.parameters())
    # the lowered rate is in the later checkpoints' scheduler state, so a resumed run keeps it
    sched = torch.load(tmp_path / "run" / "checkpoint-10" / "scheduler.pt", weights_only=True)
    assert sched["base_lrs"] == [pytest.approx(1.5e-3)] * len(sched["base_lrs"])


def test_stop_mode_raises_a_clear_error(tiny_recipe, poison_technique):
    built = build(guarded_recipe(tiny_recipe, [3, 4, 5], max_consecutive=3, on_diverge="stop"))
    with pytest.raises(Diverged, match=r"3 non-finite steps in a row \(steps 3-5\)"):
        built.trainer.train()
    assert built.techniques[0].guard.skipped_steps == [3, 4, 5]


def test_rollbacks_are_limited(tiny_recipe, poison_technique):
    built = build(guarded_recipe(tiny_recipe, [4, 5, 6, 7], max_consecutive=2, max_rollbacks=1))
    with pytest.raises(Diverged, match="after 1 rollbacks"):
        built.trainer.train()


def test_rollback_needs_checkpoints(tiny_recipe):
    recipe = Recipe.parse(tiny_recipe(techniques=[{"name": "divergence_guard"}]))
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.on_diverge: rollback needs checkpoints"):
        make_techniques(recipe)
    make_techniques(Recipe.parse(tiny_recipe(techniques=[{"name": "divergence_guard", "on_diverge": "stop"}])))


def test_state_round_trip():
    guard = DivergenceGuard()
    guard.skipped_steps, guard.consecutive, guard.first_bad_step = [3, 8], 1, 8
    guard.rollbacks = [{"step": 5, "checkpoint": "c", "lr": 0.1}]
    other = DivergenceGuard()
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()
