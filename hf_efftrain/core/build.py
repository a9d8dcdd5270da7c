"""Recipe -> tokenizer, model, datasets, collator, TrainingArguments and an EffTrainer.

Techniques are instantiated once, sorted by ``order``, validated against each other and the environment, and
then given each build-time hook in turn. Nothing here knows any technique by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..builtins import get_tokenizer, is_builtin
from ..errors import RecipeError
from ..runtime.distributed import launch_training_defaults
from . import data as data_mod
from .evaluation import metric_kwargs
from .model_loading import (
    check_model_folder,
    check_vocab,
    declare_loss_kwargs,
    load_config,
    load_model,
    model_kwargs,
)
from .recipe import Recipe
from .recipe_checks import check_attention_env, check_dtype_env
from .registry import get_technique
from .technique import Env, Technique, blamed

logger = logging.getLogger(__name__)

# Our defaults where TrainingArguments' own would surprise: the first step's loss logged (run report), token
# counts without padding (tokens/s). (`report_to` is not here: transformers v5 already defaults it to "none".)
TRAINING_DEFAULTS = {
    "logging_steps": 10,
    "logging_first_step": True,
    "include_num_input_tokens_seen": "non_padding",
    "save_strategy": "no",
}


@dataclass
class Built:
    recipe: Recipe
    task: str
    techniques: list[Technique]
    tokenizer: Any
    model: Any
    train_dataset: Any
    eval_dataset: Any
    collator: Any
    args: Any
    trainer: Any
    data_stats: dict[str, Any] = field(default_factory=dict)  # per split: rows, skipped_empty, truncated

    def plain_trainer(self):
        """The stock ``transformers.Trainer`` on the same model, data and arguments, with no hf_efftrain code in
        the loop: the baseline every benchmark compares against. Techniques whose whole effect is on the
        TrainingArguments (``only_training_args()``: mixed_precision bf16/fp16 autocast) are allowed, so a baseline
        can run in bf16; any other is a RecipeError."""
        from transformers import Trainer

        for i, t in enumerate(self.recipe.techniques):
            technique = next(x for x in self.techniques if x.config is t)
            if not technique.only_training_args():
                raise RecipeError(
                    f"techniques[{i}]", f"{t.name} runs in the training loop; the stock-Trainer baseline cannot run it"
                )
        return Trainer(
            model=self.model,
            args=self.args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            data_collator=self.collator,
            processing_class=self.tokenizer,
            **metric_kwargs(self.task),  # the same eval metrics as the EffTrainer
        )


def make_techniques(recipe: Recipe, env: Env | None = None) -> list[Technique]:
    """Instantiate, check requires/conflicts, run each ``validate``, then check model.attn_implementation against
    this machine; sorted by ``order``."""
    env = env or Env.detect()
    names = recipe.technique_names()
    techniques = []
    for i, cfg in enumerate(recipe.techniques):
        cls = get_technique(cfg.name, f"techniques[{i}].name")
        missing = sorted(cls.requires - set(names))
        if missing:
            raise RecipeError(f"techniques[{i}]", f"{cls.name} requires {', '.join(missing)} in the recipe")
        clash = sorted(n for n in names if n in cls.conflicts or cls.name in get_technique(n).conflicts)
        if clash:
            raise RecipeError(f"techniques[{i}]", f"{cls.name} cannot be combined with {', '.join(clash)}")
        technique = cls(cfg)
        with blamed(recipe, technique):
            technique.validate(recipe, env)
        techniques.append(technique)
    check_attention_env(recipe.model.attn_implementation, env)
    check_dtype_env(recipe, env)
    return sorted(techniques, key=lambda t: t.order)


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    source = recipe.model.tokenizer or recipe.model.name_or_path
    path = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    _require_local(source, path)
    check_model_folder(recipe.model.name_or_path)
    if is_builtin(source):
        return data_mod.with_chat_template(get_tokenizer(), recipe.model.chat_template)
    revision = None if recipe.model.tokenizer else recipe.model.revision  # model.revision pins the model's repo
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except Exception as e:
        raise RecipeError(
            path,
            f"no tokenizer at {source!r} ({type(e).__name__}); give a local folder "
            "with tokenizer files, or a builtin: model",
        ) from None
    if tokenizer.pad_token is None:  # e.g. GPT-2 style tokenizers: pad with EOS (labels are -100 there anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return data_mod.with_chat_template(tokenizer, recipe.model.chat_template)  # model.chat_template, if set


def _require_local(name: str, path: str) -> None:
    """A path-like name that does not exist is a typo, not a hub id: say so before anything tries the hub."""
    if not is_builtin(name) and not Path(name).exists() and name.startswith((".", "/", "~", "runs/")):
        raise RecipeError(path, f"folder not found: {name}")


def infer_task(recipe: Recipe, config, columns: list[str]) -> str:
    """``model.task`` if given, else from the data's columns, the model's ``architectures`` and the recipe's
    objective (``Technique.objective``: preference pairs train a policy under dpo, a reward model under reward_model;
    without one, a sequence-classification checkpoint is a reward model)."""
    if recipe.model.task != "auto":
        return recipe.model.task
    d = recipe.data
    arch = (getattr(config, "architectures", None) or [""])[0]
    fmt = data_mod.data_format(d, columns)
    if fmt == "preference":
        if config.is_encoder_decoder:
            raise RecipeError("model.task", "preference data trains a decoder-only model here, not an encoder-decoder")
        return recipe_objective(recipe) or ("reward" if arch.endswith("ForSequenceClassification") else "preference")
    if arch.endswith("ForSequenceClassification") or d.label_field in columns and d.text_field in columns:
        return "classification"
    if fmt != "text":  # prompt_completion, messages, sharegpt (core/data/formats.py)
        return "seq2seq" if config.is_encoder_decoder else "sft"
    if arch.endswith("ForMaskedLM"):
        return "masked_lm"
    if config.is_encoder_decoder:
        return "seq2seq"
    return "causal_lm"


def recipe_objective(recipe: Recipe) -> str | None:
    """The task that the recipe's objective technique defines (``Technique.objective``), if it has one."""
    return next((o for n in recipe.technique_names() if (o := get_technique(n).objective)), None)


def _require_objective(task: str, techniques) -> None:
    """A task whose loss no model computes (preference pairs) needs a technique that defines it, and such a
    technique needs its task (``Technique.objective``)."""
    objectives = [t for t in techniques if t.objective]
    if task in data_mod.PAIR_TASKS and not objectives:
        fix = "{name: reward_model}" if task == "reward" else "{name: dpo} (a reward model: {name: reward_model})"
        raise RecipeError("techniques", f"preference data (chosen / rejected) needs an objective: add {fix}")
    for t in objectives:
        if t.objective != task:
            raise RecipeError(
                "model.task",
                f"{t.name} is the objective of model.task {t.objective} (prompt, chosen, rejected), not {task}",
            )


def make_training_args(recipe: Recipe, techniques: list[Technique]):
    import torch
    from transformers import TrainingArguments

    values = {**TRAINING_DEFAULTS, **recipe.training}
    if not torch.cuda.is_available():  # pinned memory only helps host-to-GPU copies
        values.setdefault("dataloader_pin_memory", False)
    values = {**launch_training_defaults(), **values}  # e.g. gloo for a launched CPU run (distributed.py)
    try:
        args = TrainingArguments(**values)
    except (ValueError, TypeError) as e:
        raise RecipeError("training", str(e).strip().splitlines()[0]) from None
    for t in techniques:
        with blamed(recipe, t):
            args = t.training_args(args)
    return args


def build(recipe: Recipe, env: Env | None = None) -> Built:
    """Everything a run needs, ready for ``built.trainer.train()``."""
    import transformers

    from .trainer import EffTrainer

    techniques = make_techniques(recipe, env)
    args = make_training_args(recipe, techniques)
    transformers.set_seed(args.seed)
    tokenizer = load_tokenizer(recipe)
    config = load_config(recipe, tokenizer)

    task, train_dataset, eval_dataset, stats = load_data(recipe, config, tokenizer, args, techniques)

    kwargs = model_kwargs(recipe, techniques)
    if stats.get("classifier_head") == "re-initialized":  # the data's classes are not the checkpoint's
        kwargs["ignore_mismatched_sizes"] = True
    model = load_model(recipe, config, task, kwargs)
    check_vocab(model, tokenizer)
    for t in techniques:
        with blamed(recipe, t):
            model = t.on_model(model)
    declare_loss_kwargs(model)

    collator = data_mod.make_collator(task, tokenizer, model)
    for t in techniques:
        with blamed(recipe, t):
            collator = t.collator(collator)

    trainer = EffTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        techniques=techniques,
        **metric_kwargs(task),  # eval metrics per task (evaluation.py)
    )
    return Built(
        recipe, task, techniques, tokenizer, model, train_dataset, eval_dataset, collator, args, trainer, stats
    )


def load_data(recipe: Recipe, config, tokenizer, args, techniques: list[Technique] | tuple = (), transform=True):
    """Load, check and tokenize the train/eval data, then the techniques' ``on_dataset`` (``transform=False``: the
    tokenized data as is, what ``dry_run`` checks); returns (task, train, eval, stats)."""
    with args.main_process_first(desc="load and tokenize data"):
        sources = data_mod.load_sources(recipe.data)  # data.train (one source or a weighted list), data.eval
        task = infer_task(recipe, config, sources.columns)
        _require_objective(task, techniques)
        cols = data_mod.task_columns(task, recipe.data, sources.columns)
        # Seeded like the Trainer's sampler, so a resumed run rebuilds the same mixture and held-out rows.
        train_split, eval_split = sources.splits(cols, args.seed if args.data_seed is None else args.data_seed)
        stats: dict[str, Any] = {}
        if task == "classification":  # class ids agreed with the checkpoint's head (data/labels.py)
            head = data_mod.checkpoint_head(config) if recipe.model.loads_weights() else None
            splits, names = data_mod.encode_labels(_as_dict(train_split, eval_split), recipe.data.label_field, head)
            train_split, eval_split = splits["train"], splits.get("eval")
            stats.update(data_mod.set_label_config(config, names, recipe.model.num_labels, head))
            config.pad_token_id = tokenizer.pad_token_id
        if task == "reward":  # one output: the reward, read at each row's last non-pad token
            head = data_mod.checkpoint_head(config) if recipe.model.loads_weights() else None
            stats.update(data_mod.set_label_config(config, ["reward"], None, head))
            config.pad_token_id = tokenizer.pad_token_id
        train_split = _head(train_split, recipe.data.max_train_samples)
        eval_split = _head(eval_split, recipe.data.max_eval_samples)
        train_dataset = data_mod.tokenize(train_split, task, tokenizer, recipe.data, "data.train", stats)
        eval_dataset = (
            data_mod.tokenize(eval_split, task, tokenizer, recipe.data, "data.eval", stats) if eval_split else None
        )
        check_data_fits(recipe, config, args, train_dataset, eval_dataset)
        for t in techniques if transform else ():
            with blamed(recipe, t):
                train_dataset = t.on_dataset(train_dataset, tokenizer)

    if eval_dataset is None and args.eval_strategy != "no":
        raise RecipeError(
            "training.eval_strategy",
            "needs an evaluation set: set data.eval, data.eval_split or data.eval_fraction, or use a source with a "
            "validation split",
        )
    return task, train_dataset, eval_dataset, stats


def check_data_fits(recipe: Recipe, config, args, train_dataset, eval_dataset) -> None:
    """Checks that need the tokenized data, before any model weight is allocated: rows longer than the model's
    positions (an index error mid-run) and a global batch larger than the data (every step one short batch, and
    samples/s computed from the requested batch)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and recipe.data.max_length > positions:
        for dataset in (train_dataset, eval_dataset):
            longest = max((len(r) for r in dataset["input_ids"]), default=0) if dataset is not None else 0
            if longest > positions:
                raise RecipeError(
                    "data.max_length",
                    f"{recipe.data.max_length}, and rows of {longest} tokens, but the model takes at most "
                    f"{positions} positions (config.max_position_embeddings); set data.max_length <= {positions}",
                )
    batch = args.per_device_train_batch_size * args.world_size
    if batch > len(train_dataset):
        raise RecipeError(
            "training.per_device_train_batch_size",
            f"{args.per_device_train_batch_size} x {args.world_size} processes is more than the "
            f"{len(train_dataset)} training examples; at most {max(1, len(train_dataset) // args.world_size)}",
        )


def _as_dict(train, eval_split):
    import datasets

    splits = {"train": train}
    if eval_split is not None:
        splits["eval"] = eval_split
    return datasets.DatasetDict(splits)


def _head(dataset, n: int | None):
    if dataset is None or n is None or n >= len(dataset):
        return dataset
    return dataset.select(range(n))
