"""The technique contract (docs/ARCHITECTURE.md): a Technique wires one functional core into EffTrainer's hooks.

Every hook has a do-nothing default, so a technique overrides only what it needs. Build-time hooks
(``model_kwargs``, ``on_model``, ``on_dataset``, ``collator``, ``training_args``) are called by ``build.py`` in
``order``; run-time hooks (``on_batch``, ``loss``, ``callbacks``) by ``EffTrainer``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..errors import RecipeError

if TYPE_CHECKING:
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from ..runtime.flop_count import ComputeFraction

# Documented order bands: lower runs first in every hook.
ORDER_INIT = 100
ORDER_ADAPTER = 300
ORDER_DEFAULT = 500
ORDER_WRAPPER = 900


class TechniqueConfig(BaseModel):
    """Base of every technique's Config: frozen, unknown keys rejected, every field described."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str


@dataclass(frozen=True)
class Env:
    """What the run will see, for ``validate``: hardware, process count, installed optional packages."""

    cuda: bool = False
    bf16_supported: bool = True
    cpu_bf16_native: bool = True  # bf16 matmuls at native speed on this CPU (runtime/flops.cpu_bf16_native)
    world_size: int = 1
    installed: frozenset[str] = field(default_factory=frozenset)
    # "DEEPSPEED" / "FSDP" under such an `accelerate launch`, else None; and the DeepSpeed config it will use.
    distributed_type: str | None = None
    deepspeed_config: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def bf16_native(self) -> bool:
        """bf16 matmuls at native speed on the device the run computes on (an Ampere+ GPU, or such a CPU)."""
        return self.bf16_supported if self.cuda else self.cpu_bf16_native

    @classmethod
    def detect(cls) -> Env:
        import os

        import torch

        from ..runtime.distributed import deepspeed_config_of, engine_of
        from ..runtime.flops import cpu_bf16_native

        cuda = torch.cuda.is_available()
        optional = ("flash_attn", "flash_attn_interface", "bitsandbytes", "deepspeed", "peft")
        return cls(
            cuda=cuda,
            bf16_supported=torch.cuda.is_bf16_supported() if cuda else True,
            cpu_bf16_native=cpu_bf16_native(),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            installed=frozenset(p for p in optional if importlib.util.find_spec(p) is not None),
            distributed_type=engine_of(),
            deepspeed_config=deepspeed_config_of(),
        )


class Technique:
    """Base class; subclasses set the ClassVars and override hooks. ``self.config`` is the validated Config."""

    name: ClassVar[str]
    Config: ClassVar[type[TechniqueConfig]]
    survey_section: ClassVar[str]
    paper: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    conflicts: ClassVar[frozenset[str]] = frozenset()
    order: ClassVar[int] = ORDER_DEFAULT
    # The task whose loss this technique's ``loss`` defines (dpo: "preference"): no model computes it, so the hook
    # also gives the evaluation loss, and the task is refused without such a technique (build._require_objective).
    objective: ClassVar[str | None] = None

    def __init__(self, config: TechniqueConfig | None = None, **kwargs: Any):
        self.config = config if config is not None else self.Config(name=self.name, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @classmethod
    def status(cls) -> str:
        """One word for `hf-efftrain techniques`: 'ready', or what is missing on this machine."""
        return "ready"

    # ---- build time -------------------------------------------------------------------------------------
    def validate(self, recipe: Any, env: Env) -> None:
        """Raise RecipeError (with the field path) when this technique cannot run with this recipe/env."""

    def model_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Adjust ``from_pretrained``/``from_config`` keyword arguments (attn_implementation, dtype, ...)."""
        return kwargs

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Model surgery after loading: init, patches, PEFT wrapping."""
        return model

    def on_dataset(self, dataset: Any, tokenizer: Any) -> Any:
        """Transform the tokenized training dataset (pruning, packing, curricula)."""
        return dataset

    def collator(self, collator: Any) -> Any:
        """Wrap or replace the data collator."""
        return collator

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        """Adjust TrainingArguments before the trainer is built."""
        return args

    def optimizer_cls_and_kwargs(self, args: TrainingArguments) -> tuple[type, dict[str, Any]] | None:
        """An optimizer class and its kwargs, exactly what ``Trainer(optimizer_cls_and_kwargs=...)`` takes."""
        return None

    # ---- run time ---------------------------------------------------------------------------------------
    def on_trainer(self, trainer: Any) -> None:
        """Called once the EffTrainer exists (e.g. to rebuild its optimizer when the model grows)."""

    def on_batch(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """Per-batch transform before the forward pass."""
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], compute_loss: Any) -> torch.Tensor | None:
        """Return a loss to replace the default one, or None to leave it alone."""
        return None

    def callbacks(self) -> list[TrainerCallback]:
        return []

    def metrics(self, split: str) -> dict[str, float]:
        """Numbers for the log line being written (``split``: "train" or "eval"), e.g. averages since the last
        line; EffTrainer.log adds them (under ``eval_`` for an evaluation)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Whatever resuming this technique needs: plain containers and tensors (saved with torch.save in every
        checkpoint folder, loaded before training resumes)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def only_training_args(self) -> bool:
        """True when this technique's whole effect is its ``training_args`` hook (e.g. bf16 autocast), so the
        stock-Trainer baseline of a benchmark can run it too (``Built.plain_trainer``)."""
        return False

    def report(self) -> dict[str, Any]:
        """Extra facts for run_report.json (e.g. what a helper chose); the resolved config is always there."""
        return {}

    def compute_fraction(self, model: torch.nn.Module, steps: int, seq_len: int) -> ComputeFraction | None:
        """How much of the counted training compute the run did, for the FLOPs per token and MFU in run_report.json
        (``runtime/flop_count.py``): per block and for the rest of the model, the average share of each part
        (matmul forward / input grad / weight grad, attention forward / backward) over ``steps`` optimizer steps
        of ``seq_len``-token examples, with a note of what was assumed. None (the default): the model as trained
        (frozen weights included) says it all. Called once, after training, with the trained model."""
        return None


# A technique's error about another section names that section's field (model.task, data.eval): left as it is.
_SECTIONS = ("model", "data", "training", "techniques")


@contextmanager
def blamed(recipe: Any, technique: Technique) -> Iterator[None]:
    """Re-raise a technique's RecipeError with its field path under ``techniques[i]``, where the recipe sets it."""
    try:
        yield
    except RecipeError as e:
        if e.path.split(".")[0].split("[")[0] in _SECTIONS:
            raise
        i = next((i for i, c in enumerate(recipe.techniques) if c is technique.config), None)
        if i is None:  # built by hand, not from this recipe
            raise
        raise RecipeError(f"techniques[{i}]" + (f".{e.path}" if e.path else ""), e.message) from None


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def refuse_pretrained_weights(
    recipe: Any, technique: str, keep: str = "", does: str = "re-initializes the model's weights"
) -> None:
    """A technique that replaces the weights (an initialization) or drops layers (progressive stacking's truncation):
    on a model that loads pretrained ones, fine-tuning would silently start from noise or from a few layers. Refused
    unless the recipe builds the model from its config (builtin:, ``model.from_scratch``)."""
    model = getattr(recipe, "model", None)
    if model is not None and getattr(model, "loads_weights", lambda: False)():
        raise RecipeError(
            "",
            f"{technique} {does}, which would discard the pretrained weights of {model.name_or_path}; set "
            f"model.from_scratch: true to pre-train this architecture from its config, or remove {technique}{keep}",
        )
