"""``hf-efftrain validate``: a dry build. It runs what ``build()`` runs before the first step, with the model on the
meta device, so every user error ``train`` would raise before training is raised here, with the same message.

Per step of ``train``, what the dry build does:
- a ``training.resume_from_checkpoint`` folder must exist (as ``run.train``; its files are verified when training
  starts, which reads them all: not here).
- techniques, ``validate``, TrainingArguments and the techniques' ``training_args``: as ``build()``.
- tokenizer, config (``config_overrides``), data: as ``build()`` (``load_data``: files, columns, labels, whole
  splits tokenized, lengths against the model's positions, batch against the data, eval set for eval_strategy).
- ``on_dataset``: not run. These hooks transform the data at full cost (data_pruning trains proxy models or loads a
  reference model, and writes its scores into output_dir): a dry run must neither take that time nor write. So
  what such a hook alone refuses is refused by ``train`` only (packing on a task inferred as masked_lm), and the
  example printed is the tokenized row before them (and before run-time batch changes: token dropping, masking).
- model: ``from_config`` under ``torch.device("meta")`` (no weights allocated, none read). A local folder's weight
  files are checked as ``from_pretrained`` would find them (``check_weight_files``, then transformers' own
  checkpoint resolver) but not read. Arguments only ``from_pretrained`` takes (quantization_config, device_map,
  tensor-parallel plans) act at load time and are not checked; nor are a hub model's weight files (looking them up
  would download them). Then the embedding against the tokenizer.
- ``model_kwargs``: run. ``on_model``: run on the meta model; a ``RecipeError`` is the user's, as in ``train``. A
  hook that needs real weights (reloading to quantize, reading weight values) fails on meta tensors in its own way:
  it is listed in ``DryBuild.unchecked``, and so are the steps after it that depend on its result.
- collator and the techniques' ``collator``: built. EffTrainer: built (``Trainer.__init__``'s argument checks, the
  Accelerator, the techniques' ``callbacks`` and ``on_trainer``), minus the move of the model to the device, and
  without leaving the output folder it would create. Then the launch check of ``train`` (``check_engine``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..runtime.checkpoint import CheckpointError
from ..runtime.distributed import check_engine, prepare_launch_env
from . import data as data_mod
from .build import load_data, load_tokenizer, make_techniques, make_training_args
from .data.preference import REJECTED
from .evaluation import metric_kwargs
from .example import render_example
from .model_loading import (
    TASK_AUTO_CLASS,
    _first_line,
    check_vocab,
    check_weight_files,
    declare_loss_kwargs,
    from_config_kwargs,
    load_config,
    model_kwargs,
)
from .recipe import Recipe
from .technique import Env, Technique, blamed
from .trainer import EffTrainer


@dataclass
class DryBuild:
    recipe: Recipe
    task: str
    techniques: list[Technique]
    tokenizer: Any
    model: Any  # on the meta device
    train_dataset: Any
    eval_dataset: Any
    collator: Any
    trainer: Any
    unchecked: list[str] = field(default_factory=list)  # "<step>: <why>", for what needs real weights
    data_stats: dict[str, Any] = field(default_factory=dict)


class DryTrainer(EffTrainer):
    """EffTrainer on a meta-device model: everything ``__init__`` checks, nothing moved."""

    def _move_model_to_device(self, model, device) -> None:  # meta tensors have no data to copy
        pass


def dry_build(recipe: Recipe, env: Env | None = None) -> DryBuild:
    """``build()`` without weights and without the data transforms; see the module docstring."""
    import transformers

    resume = recipe.training.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume.lower() != "true" and not os.path.isdir(resume):  # as run.train does
        raise CheckpointError(f"no checkpoint folder at {resume}")
    prepare_launch_env()
    techniques = make_techniques(recipe, env)
    args = make_training_args(recipe, techniques)
    args.push_to_hub = False  # a dry run creates no hub repository
    transformers.set_seed(args.seed)
    tokenizer = load_tokenizer(recipe)
    config = load_config(recipe, tokenizer)
    task, train_dataset, eval_dataset, stats = load_data(recipe, config, tokenizer, args, techniques, transform=False)

    model = meta_model(recipe, config, task, model_kwargs(recipe, techniques))
    check_vocab(model, tokenizer)
    unchecked: list[str] = []
    for t in techniques:
        try:
            with blamed(recipe, t):
                model = t.on_model(model)
        except RecipeError:
            raise
        except Exception as e:  # the hook needs real weights (module docstring)
            unchecked.append(f"{t.name}.on_model: {_first_line(e)}")
    declare_loss_kwargs(model)
    collator = data_mod.make_collator(task, tokenizer, model)
    for t in techniques:
        with blamed(recipe, t):
            collator = t.collator(collator)

    trainer = None
    try:
        with _no_new_folder(Path(args.output_dir)):
            trainer = DryTrainer(
                model=model,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                data_collator=collator,
                processing_class=tokenizer,
                techniques=techniques,
                **metric_kwargs(task),
            )
        check_engine(trainer)
    except RecipeError:
        raise
    except Exception as e:
        if not unchecked:
            raise
        unchecked.append(f"trainer: {_first_line(e)}")  # follows from a hook that could not run on meta
    return DryBuild(
        recipe, task, techniques, tokenizer, model, train_dataset, eval_dataset, collator, trainer, unchecked, stats
    )


def meta_model(recipe: Recipe, config, task: str, kwargs: dict[str, Any]):
    """The model on the meta device from its config; a local folder's weight files are checked, not read."""
    import torch
    import transformers

    name = recipe.model.name_or_path
    if recipe.model.loads_weights() and Path(name).is_dir():
        check_weight_files(Path(name))
        _resolve_weights(name, config)
    kwargs = from_config_kwargs(kwargs)
    auto = getattr(transformers, TASK_AUTO_CLASS[task])
    with torch.device("meta"):
        return auto.from_config(config, **kwargs)


def _resolve_weights(name: str, config) -> None:
    """The weight files ``from_pretrained`` would load from a local folder, found by transformers' own resolver (so a
    missing file gets the message ``train`` prints), without reading them."""
    from transformers.modeling_utils import _get_resolved_checkpoint_files

    try:
        _get_resolved_checkpoint_files(
            name,
            variant=None,
            gguf_file=None,
            use_safetensors=None,
            user_agent=None,
            is_remote_code=False,
            transformers_explicit_filename=getattr(config, "transformers_weights", None),
        )
    except OSError as e:  # the message of build.load_model
        raise RecipeError("model.name_or_path", f"could not load the weights of {name}: {_first_line(e)}") from None


@contextlib.contextmanager
def _no_new_folder(path: Path):
    """Remove what the Trainer creates of ``path`` (it makes output_dir in ``__init__``) if it holds no file then."""
    path = path.absolute()
    top = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        top = p
    try:
        yield
    finally:
        if top is not None and top.is_dir() and not any(f for _, _, files in os.walk(top) for f in files):
            for folder, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                os.rmdir(folder)


def example_lines(dry: DryBuild) -> list[str]:
    """The first training example as the model gets it, with its loss mask (``example.render_example``)."""
    row = dry.train_dataset[0]
    if "labels" not in row:  # masked LM: the collator draws the masked positions and their labels
        batch = data_mod.make_collator(dry.task, dry.tokenizer)([row])
        row = {k: batch[k][0].tolist() for k in ("input_ids", "labels")}
    config = dry.model.config
    names = config.id2label if dry.task == "classification" else None
    aligned = not getattr(config, "is_encoder_decoder", False)
    lines = render_example(dry.tokenizer, row["input_ids"], row.get("labels"), aligned, names)
    if REJECTED + "input_ids" in row:  # a preference pair: the chosen side above, the rejected one below
        rejected = render_example(dry.tokenizer, row[REJECTED + "input_ids"], row[REJECTED + "labels"], True, None)
        lines = [f"chosen {lines[0]}", *lines[1:], f"rejected {rejected[0]}", *rejected[1:]]
    if dry.task == "reward":  # [[ ]] marks the responses; a reward model has no token loss
        last = [dry.tokenizer.decode(ids[-1:]) for ids in (row["input_ids"], row[REJECTED + "input_ids"])]
        lines.append(f"the reward is read at each side's last token ({last[0]!r}, {last[1]!r}), not a token loss")
    return lines
