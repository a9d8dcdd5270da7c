"""The one way techniques patch a model (docs/ARCHITECTURE.md): ``patch_attr`` sets an attribute and returns an
undo handle.

Use it only where no public hook exists (e.g. wrapping a decoder layer's ``forward`` for token or layer
dropping). Patches are applied to instances, never at import time, and ``undo()`` restores exactly what was there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_MISSING = object()


@dataclass
class Patch:
    obj: Any
    name: str
    original: Any  # the instance's own attribute before patching, or _MISSING (then the class attribute showed)
    active: bool = field(default=True)

    def undo(self) -> None:
        if not self.active:
            return
        if self.original is _MISSING:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.original)
        self.active = False


@dataclass
class Patches:
    """Several patches undone together, last first."""

    items: list[Patch] = field(default_factory=list)

    def add(self, patch: Patch) -> Patch:
        self.items.append(patch)
        return patch

    def undo(self) -> None:
        while self.items:
            self.items.pop().undo()


def patch_attr(obj: Any, name: str, value: Any) -> Patch:
    """Set ``obj.name = value`` and return a handle whose ``undo()`` puts back the previous state."""
    patch = Patch(obj, name, _own(obj, name))
    setattr(obj, name, value)
    return patch


def route_training_loss(trainer: Any, loss: Any) -> Patch:
    """Send a stock ``transformers.Trainer``'s training-mode loss calls through
    ``loss(model, inputs, original_compute_loss, num_items_in_batch)`` (None: the original's loss); evaluation and
    ``return_outputs`` calls keep the original. Returns the undo handle. How a technique's ``loss`` hook is used
    by hand, without EffTrainer."""
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and not return_outputs:
            out = loss(model, inputs, original, num_items_in_batch)
            if out is not None:
                return out
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return patch_attr(trainer, "compute_loss", compute_loss)


def _own(obj: Any, name: str) -> Any:
    """The object's own value for ``name`` (an nn.Module keeps parameters, buffers and children apart)."""
    own = vars(obj) if hasattr(obj, "__dict__") else {}
    if name in own:
        return own[name]
    for registry in ("_parameters", "_buffers", "_modules"):
        if name in own.get(registry, {}):
            return own[registry][name]
    return _MISSING if hasattr(obj, "__dict__") else getattr(obj, name)
