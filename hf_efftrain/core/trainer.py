"""EffTrainer: ``transformers.Trainer`` that dispatches the run-time technique hooks (docs/ARCHITECTURE.md).

It adds these and nothing technique-specific: the optimizer a technique asks for (through the stock
``optimizer_cls_and_kwargs`` argument), per-batch transforms (in ``get_batch_samples``), loss overrides (in
``compute_loss``), the techniques' callbacks, and safe checkpoints (checkpoint.py: staged save with the techniques'
state and a manifest, verified resume, a checkpoint on SIGTERM/SIGINT).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from transformers import Trainer

from ..errors import RecipeError
from ..runtime import checkpoint
from .technique import Technique

logger = logging.getLogger(__name__)

STATE_FILE = "efftrain_state.pt"  # torch.save: techniques may keep tensors (masks)


class EffTrainer(Trainer):
    def __init__(self, model=None, args=None, *, techniques: Sequence[Technique] = (), **kwargs: Any):
        self.techniques = sorted(techniques, key=lambda t: t.order)
        if kwargs.get("optimizer_cls_and_kwargs") is None and args is not None:
            chosen = [(t, o) for t in self.techniques if (o := t.optimizer_cls_and_kwargs(args)) is not None]
            if len(chosen) > 1:
                raise ValueError(f"more than one technique sets the optimizer: {[t.name for t, _ in chosen]}")
            if chosen:
                kwargs["optimizer_cls_and_kwargs"] = chosen[0][1]
        callbacks = list(kwargs.pop("callbacks", None) or [])
        for t in self.techniques:
            callbacks.extend(t.callbacks())
        self.preemption = checkpoint.Preemption()
        callbacks.append(self.preemption)
        try:
            super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        except ValueError as e:  # an argument combination Trainer.__init__ refuses (_validate_args, Accelerator setup)
            raise RecipeError("training", (str(e).strip().splitlines() or [""])[0]) from None
        for t in self.techniques:
            t.on_trainer(self)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Per-batch transforms run here, on each micro-batch of the step, before the Trainer counts the loss
        # denominator (num_items_in_batch) and the tokens seen: a batch that a technique shortens or re-labels is
        # then normalised and counted as what the model really sees. Only the training loop calls this.
        if self.techniques:
            step = self.state.global_step
            epoch_iterator = (self._transform(batch, step) for batch in epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _transform(self, batch, step: int):
        for t in self.techniques:
            batch = t.on_batch(batch, step)
        return batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training and not return_outputs
        default = partial(super().compute_loss, num_items_in_batch=num_items_in_batch)
        # A technique's loss replaces the training loss; an objective's (Technique.objective) is the evaluation's too.
        for t in self.techniques:
            if training or t.objective:
                loss = t.loss(model, inputs, default)
                if loss is not None:  # an evaluation gets no outputs: prediction_step reads them as a mapping
                    return (loss, {}) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        for t in self.techniques:
            for k, v in t.metrics(split).items():
                logs[f"eval_{k}" if split == "eval" else k] = v
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """As the stock ``train``, but ``resume_from_checkpoint=True`` takes the newest checkpoint that verifies
        (skipping partial or corrupt ones), a given path must verify, and a SIGTERM/SIGINT ends in a checkpoint and
        ``checkpoint.Preempted``."""
        if resume_from_checkpoint:
            resume_from_checkpoint = checkpoint.resolve_resume(resume_from_checkpoint, self.args.output_dir)
            load_technique_state(self.techniques, resume_from_checkpoint)
        with self.preemption.armed():
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self.preemption.raise_if_stopped()
        return output

    def _save_checkpoint(self, model, trial):
        save = partial(super()._save_checkpoint, model, trial)
        checkpoint.save_staged(self, save, trial, partial(save_technique_state, self.techniques))


def save_technique_state(techniques: Sequence[Technique], folder: str) -> None:
    """Every technique's ``state_dict()`` in one file of the checkpoint folder, for resume."""
    if techniques:
        torch.save({t.name: t.state_dict() for t in techniques}, os.path.join(folder, STATE_FILE))


def load_technique_state(techniques: Sequence[Technique], checkpoint: str | None) -> None:
    path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
    if not path or not os.path.exists(path):
        return
    states = torch.load(path, weights_only=True)  # plain containers and tensors only
    for t in techniques:
        if t.name in states:
            t.load_state_dict(states[t.name])
