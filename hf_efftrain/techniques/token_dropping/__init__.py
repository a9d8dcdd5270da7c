"""Token dropping: the middle layers of a transformer process only a subset of the sequence's tokens.

Two strategies (survey arXiv 2302.01107, "Computation efficiency / Token dropping"):

``random`` -- random-LTD, Yao et al. 2022, "Random-LTD: Random and Layerwise Token Dropping Brings Efficient
Training for Large-scale Transformers", arXiv 2211.11586: every dropping layer runs on its own random sorted subset
of the tokens. The first and last layers always see all tokens (``full_first``/``full_last``).

``importance`` -- Hou et al. 2022, "Token Dropping for Efficient BERT Pretraining", arXiv 2203.13240, for masked-LM
encoders: the middle layers (default from L/2 on) run on the tokens whose ids have the highest running MLM loss.

The parts: ``subset.py`` runs one layer on a subset of the tokens (gather, scatter back; the per-architecture
``DropPolicy``); ``importance.py`` keeps the per-token-id importance; ``dropper.py`` patches the middle layers
(``TokenDropper``) and holds the kept-count schedule; here are the config and the technique.

With keep = 1.0, or in ``model.eval()``, the original layer forward runs untouched: outputs equal the unpatched
model's bitwise. Functional core: ``TokenDropper(model, ...)`` (``.keep``, ``.undo()``) and ``TokenDroppingCallback``
for the stock Trainer.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainingArguments

from ...core.registry import register_technique
from ...core.technique import Technique, TechniqueConfig
from ...errors import RecipeError
from .dropper import TokenDropper, TokenDroppingCallback, keep_fraction, kept_count  # noqa: F401  (re-exported too)
from .importance import TokenImportance
from .subset import (  # noqa: F401  (re-exported: the functional cores are imported from the package)
    DropPolicy,
    Selection,
    flash_varlen_kwargs,
    gather_mask,
    gather_seq,
    kept_varlen_kwargs,
    put,
    register_drop_policy,
    run_on_subset,
    segment_positions,
    take,
)

logger = logging.getLogger(__name__)


class TokenDroppingConfig(TechniqueConfig):
    name: Literal["token_dropping"] = "token_dropping"
    strategy: Literal["random", "importance"] = Field(
        "random", description="random: random-LTD (decoders or encoders); importance: Hou et al. (masked-LM encoders)"
    )
    keep_start: float = Field(0.5, gt=0, le=1, description="Kept fraction of tokens in the dropping layers at first.")
    schedule: Literal["linear", "constant"] = Field(
        "linear", description="linear: keep grows to 1.0 over schedule_steps; constant: keep_start throughout."
    )
    schedule_steps: int | None = Field(
        None, ge=1, description="Steps from keep_start to 1.0; null: training.max_steps - start_step."
    )
    start_step: int = Field(0, ge=0, description="Step at which keep starts to grow (keep_start before).")
    full_first: int | None = Field(
        None, ge=1, description="First layers that see all tokens; null: 1 (random) or num_layers // 2 (importance)."
    )
    full_last: int = Field(1, ge=1, description="Last layers that see all tokens (dropped tokens rejoin before).")
    multiple_of: int = Field(8, ge=1, description="Kept count is rounded to a multiple of this (at least 1).")
    seed: int | None = Field(None, description="Seed of the random-LTD generator; null: training.seed.")
    importance_beta: float = Field(0.995, ge=0, lt=1, description="EMA factor of the per-token-id MLM loss.")
    importance_init: float = Field(10.0, description="Initial importance of a token id never seen masked yet.")


@register_technique
class TokenDroppingTechnique(Technique):
    """Patches the middle layers in ``on_model``; ``on_batch`` sets the kept fraction from the global step."""

    name = "token_dropping"
    Config = TokenDroppingConfig
    survey_section = "Computation efficiency / Token dropping"
    paper = (
        'Yao et al. 2022, "Random-LTD: Random and Layerwise Token Dropping Brings Efficient Training for Large-scale '
        'Transformers", arXiv 2211.11586; Hou et al. 2022, "Token Dropping for Efficient BERT Pretraining", '
        "arXiv 2203.13240"
    )

    config: TokenDroppingConfig

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.dropper: TokenDropper | None = None
        self.tokenizer: Any = None
        self._seed = self.config.seed if self.config.seed is not None else 42
        self._steps: int | None = self.config.schedule_steps

    def validate(self, recipe: Any, env: Any) -> None:
        c = self.config
        if (recipe.model.attn_implementation or "").startswith("flex"):
            raise RecipeError("", "cannot gather flex_attention block masks; use model.attn_implementation sdpa/eager")
        if c.strategy == "importance" and recipe.model.task not in ("auto", "masked_lm"):
            raise RecipeError("strategy", f"importance needs task masked_lm (model.task is {recipe.model.task})")
        if c.strategy == "random" and recipe.model.task in ("seq2seq",):
            raise RecipeError("strategy", "random token dropping supports decoder-only or encoder-only models")

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        if self.config.seed is None:
            self._seed = args.seed
        if self._steps is None and args.max_steps > 0:
            self._steps = max(1, args.max_steps - self.config.start_step)
        return args

    def on_dataset(self, dataset: Any, tokenizer: Any) -> Any:
        self.tokenizer = tokenizer
        return dataset

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        c = self.config
        importance = None
        if c.strategy == "importance":
            vocab = model.get_input_embeddings().num_embeddings
            tok = self.tokenizer
            specials = tok.all_special_ids if tok is not None else []
            pad = tok.pad_token_id if tok is not None else getattr(model.config, "pad_token_id", None)
            importance = TokenImportance(vocab, specials, pad, c.importance_init, c.importance_beta)
        self.dropper = TokenDropper(
            model, c.strategy, c.keep_start, c.full_first, c.full_last, c.multiple_of, self._seed, importance
        )
        return model

    def keep_at(self, step: int) -> float:
        steps = self._steps if self.config.schedule == "linear" else None
        return keep_fraction(step, self.config.keep_start, steps, self.config.start_step)

    def on_batch(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        if self.dropper is not None:
            self.dropper.keep = self.keep_at(step)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.dropper.state_dict() if self.dropper is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.dropper is not None and state:
            self.dropper.load_state_dict(state)

    def report(self) -> dict[str, Any]:
        if self.dropper is None:
            return {}
        return {"dropping_layers": self.dropper.layer_ids, "schedule_steps": self._steps, "seed": self._seed}

    def compute_fraction(self, model: torch.nn.Module, steps: int, seq_len: int) -> Any:
        """The dropping layers ran on k(t) = kept_count(seq_len, keep(t)) of seq_len tokens at step t: their matmuls
        scale by the mean of k/S over the schedule's steps, their attention (k x k scores) by the mean of (k/S)^2."""
        from ...core.layers import layer_stacks
        from ...runtime.flop_count import ComputeFraction, Parts

        if self.dropper is None or steps <= 0 or seq_len <= 0:
            return None
        keeps = (self.keep_at(t) for t in range(steps))
        kept = [1.0 if k >= 1.0 else kept_count(seq_len, k, self.config.multiple_of) / seq_len for k in keeps]
        linear, square = sum(kept) / steps, sum(f * f for f in kept) / steps
        layers = next(iter(layer_stacks(model).values()))
        parts = Parts(linear, linear, linear, square, square)
        note = (f"token dropping: layers {self.dropper.layer_ids} ran on {linear:.4g} of the tokens on average "
                f"(attention {square:.4g}), seq_len {seq_len} standing for every batch's length")  # fmt: skip
        return ComputeFraction(note, {layers[i]: parts for i in self.dropper.layer_ids})
