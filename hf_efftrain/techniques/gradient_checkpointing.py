"""Gradient (activation) checkpointing: keep only layer inputs in the forward pass, recompute the rest in backward.

Chen et al., "Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174 (survey Sec. "Memory efficiency",
rematerialization). Activation memory drops from O(layers) to O(1) layer's worth plus the saved layer inputs, for
about one extra forward pass of compute.

Transformers 5 names this ``activation_checkpointing`` (``gradient_checkpointing`` is a deprecated alias that is
only read when ``TrainingArguments`` is constructed), so this technique sets the new fields. ``every_n_layers`` is
transformers' own: ``PreTrainedModel._set_gradient_checkpointing`` turns it on for the decoder blocks with
``block_index % n == 0`` (so layers 0, 2, ... for n=2), and the Trainer pops it from the kwargs (checked in 5.24).
Functional core: ``enable_gradient_checkpointing(model, ...)`` or ``checkpointing_kwargs(...)`` for the Trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainingArguments

from ..core.registry import register_technique
from ..core.technique import Technique, TechniqueConfig


def checkpointing_kwargs(use_reentrant: bool = False, every_n_layers: int = 1, offload: bool = False) -> dict:
    """The ``TrainingArguments.activation_checkpointing_kwargs`` dict for these settings."""
    kwargs: dict[str, Any] = {"use_reentrant": use_reentrant}
    if every_n_layers != 1:
        kwargs["every_n_layers"] = every_n_layers
    if offload:
        kwargs["offload"] = True
    return kwargs


def enable_gradient_checkpointing(
    model: torch.nn.Module, use_reentrant: bool = False, every_n_layers: int = 1, offload: bool = False
) -> torch.nn.Module:
    """Turn checkpointing on for a ``PreTrainedModel`` (for hand-written loops; the Trainer does it from args)."""
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": use_reentrant},
        every_n_layers=every_n_layers,
        offload=offload,
    )
    return model


class GradientCheckpointingConfig(TechniqueConfig):
    name: Literal["gradient_checkpointing"] = "gradient_checkpointing"
    use_reentrant: bool = Field(
        False, description="torch.utils.checkpoint's reentrant variant; the non-reentrant default is recommended."
    )
    every_n_layers: int = Field(
        1, ge=1, description="Checkpoint every n-th decoder layer only; larger trades memory back for speed."
    )
    offload: bool = Field(False, description="Keep the saved layer inputs in pinned host memory instead.")


@register_technique
class GradientCheckpointingTechnique(Technique):
    """Sets ``activation_checkpointing`` (and its kwargs) in the TrainingArguments; the Trainer enables it."""

    name = "gradient_checkpointing"
    Config = GradientCheckpointingConfig
    survey_section = "Memory efficiency / Rematerialization"
    paper = 'Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174'

    config: GradientCheckpointingConfig

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        c = self.config
        existing = args.activation_checkpointing_kwargs
        kwargs = dict(existing) if isinstance(existing, dict) else {}  # keep other torch.checkpoint kwargs
        kwargs.update(checkpointing_kwargs(c.use_reentrant, c.every_n_layers, c.offload))
        # replace() reruns __post_init__, which mirrors the deprecated gradient_checkpointing* names.
        return dataclasses.replace(args, activation_checkpointing=True, activation_checkpointing_kwargs=kwargs)
