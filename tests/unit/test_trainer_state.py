"""EffTrainer saves every technique's state with each checkpoint and restores it on resume."""

from __future__ import annotations

from typing import Literal

import torch

from hf_efftrain import Recipe
from hf_efftrain.core.build import build
from hf_efftrain.core.registry import _REGISTRY, register_technique
from hf_efftrain.core.technique import Technique, TechniqueConfig
from hf_efftrain.core.trainer import STATE_FILE


class CounterConfig(TechniqueConfig):
    name: Literal["test_trainer_state"] = "test_trainer_state"


class CounterTechnique(Technique):
    """Counts training batches; its state is a number and a tensor."""

    name = "test_trainer_state"  # == this module's name, as the registry requires
    Config = CounterConfig
    survey_section = "test"
    paper = "test"

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.batches = 0
        self.trace = torch.zeros(3)

    def on_batch(self, batch, step):
        self.batches += 1
        self.trace += 1
        return batch

    def state_dict(self):
        return {"batches": self.batches, "trace": self.trace.clone()}

    def load_state_dict(self, state):
        self.batches, self.trace = state["batches"], state["trace"]


def test_technique_state_saved_in_checkpoints_and_restored(tiny_recipe, tmp_path):
    register_technique(CounterTechnique)
    try:
        data = tiny_recipe(
            techniques=[{"name": "test_trainer_state"}],
            training={"max_steps": 4, "save_strategy": "steps", "save_steps": 2},
        )
        built = build(Recipe.parse(data))
        built.trainer.train()
        (counter,) = built.techniques
        assert counter.batches == 4
        saved = torch.load(tmp_path / "run" / "checkpoint-2" / STATE_FILE, weights_only=True)
        assert saved["test_trainer_state"]["batches"] == 2 and saved["test_trainer_state"]["trace"].tolist() == [2] * 3

        data["training"]["max_steps"] = 6
        resumed = build(Recipe.parse(data))
        resumed.trainer.train(resume_from_checkpoint=True)  # latest checkpoint: 4
        assert resumed.techniques[0].batches == 6  # 4 restored + 2 new batches
    finally:
        _REGISTRY.pop("test_trainer_state", None)
