"""Reward modelling on preference pairs (``model.task: reward``, ``data.format: preference``): the Bradley-Terry
objective of Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT,
arXiv 2203.02155, eq. 1), as the reward model of RLHF and of best-of-n selection.

The model is the checkpoint's ``AutoModelForSequenceClassification`` with one output: a scalar reward ``r(x, y)``
read at the last non-pad token of prompt + response (what transformers' heads do, so the saved model scores as
any HF reward model does in a ``text-classification`` pipeline). A causal LM checkpoint gets a fresh head
(``score``); a classifier of another size is re-sized (``core/data/labels.py``). Per pair, with chosen ``y_w`` and
rejected ``y_l``,

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m) + eta (r(x, y_w) + r(x, y_l))^2

- ``m``: the pair's margin, from the data's ``margin`` column when it has one (Touvron et al. 2023, Llama 2, arXiv
  2307.09288, eq. 2: a larger margin for pairs rated further apart), else 0;
- ``eta``: ``center_rewards_coefficient`` (Eisenstein et al. 2023, arXiv 2312.09244), which pulls the rewards
  towards mean zero (their scale is otherwise free: the loss sees differences only); off by default.

This is TRL's ``RewardTrainer`` loss (``tests/techniques/test_vs_trl.py`` checks it step by step). It
logs TRL's ``accuracy`` (pairs whose chosen response scores higher), ``margin`` (mean ``r_w - r_l``) and
``mean_reward``, on train and held-out pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from ..core.data.preference import MARGIN
from ..core.registry import register_technique
from ..core.technique import TechniqueConfig
from ..errors import RecipeError
from .dpo import INPUTS, PAIR_CONFLICTS, PairObjective


def reward_loss(
    rewards: torch.Tensor, margin: torch.Tensor | None = None, center_coefficient: float = 0.0
) -> torch.Tensor:
    """The mean Bradley-Terry loss of (B, 2) rewards (column 0 chosen, 1 rejected), less a margin per pair, plus
    the centring term."""
    diff = rewards[:, 0] - rewards[:, 1]
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    if center_coefficient:
        loss = loss + center_coefficient * (rewards.sum(1) ** 2).mean()
    return loss


def pair_rewards(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(B, 2) rewards of a collated preference batch (2B rows: the chosen, then the rejected)."""
    rewards = model(**{k: batch[k] for k in INPUTS if k in batch}).logits.squeeze(-1).float()
    return torch.stack(rewards.chunk(2), 1)


class RewardModelConfig(TechniqueConfig):
    center_rewards_coefficient: float = Field(
        0.0, ge=0, le=100, description="eta of Eisenstein et al.: pulls the rewards to mean zero (TRL suggests 0.01)"
    )
    disable_dropout: bool = Field(True, description="set every dropout to 0 (TRL's default for reward models)")


@register_technique
class RewardModelTechnique(PairObjective):
    name = "reward_model"
    Config = RewardModelConfig
    survey_section = "Fine-tuning objective (preference pairs; beyond the survey)"
    paper = "Ouyang et al. 2022 (arXiv 2203.02155)"
    objective = "reward"
    conflicts = PAIR_CONFLICTS | {"dpo"}  # one objective per recipe

    def validate(self, recipe, env) -> None:
        if recipe.model.task not in ("auto", "reward"):
            raise RecipeError(
                "model.task", f"reward_model trains a reward model (model.task reward), not {recipe.model.task}"
            )

    def loss(self, model, batch, compute_loss):
        rewards = pair_rewards(model, batch)
        margin = batch[MARGIN].to(rewards.device) if MARGIN in batch else None
        loss = reward_loss(rewards, margin, self.config.center_rewards_coefficient)
        r = rewards.detach()  # TRL's names
        values = {"accuracy": (r[:, 0] > r[:, 1]).float(), "margin": r[:, 0] - r[:, 1], "mean_reward": r.mean(1)}
        self.logged.add("train" if model.training else "eval", values)
        return loss
