"""Recipe -> tokenizer, model, datasets, collator, TrainingArguments and an EffTrainer.

Techniques are instantiated once, sorted by ``order``, validated against each other and the environment, and
then given each build-time hook in turn. Nothing here knows any technique by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data as data_mod
from .builtins import BUILTIN_MODELS, builtin_config, get_tokenizer, is_builtin, strip_builtin
from .errors import RecipeError
from .recipe import Recipe
from .registry import get_technique
from .technique import Env, Technique

logger = logging.getLogger(__name__)

TASK_AUTO_CLASS = {
    "causal_lm": "AutoModelForCausalLM",
    "sft": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
}
# Our defaults where TrainingArguments' own would surprise: no external loggers, the first step's loss
# logged (run report), token counts without padding (tokens/s).
TRAINING_DEFAULTS = {
    "report_to": "none",
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

    def plain_trainer(self):
        """The stock ``transformers.Trainer`` on the same model, data and arguments, with no hf_efftrain code in
        the loop: the baseline every benchmark compares against."""
        from transformers import Trainer

        return Trainer(
            model=self.model,
            args=self.args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            data_collator=self.collator,
            processing_class=self.tokenizer,
        )


def make_techniques(recipe: Recipe, env: Env | None = None) -> list[Technique]:
    """Instantiate, check requires/conflicts, run each ``validate``; sorted by ``order``."""
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
        try:
            technique.validate(recipe, env)
        except RecipeError as e:
            raise RecipeError(f"techniques[{i}]" + (f".{e.path}" if e.path else ""), e.message) from None
        techniques.append(technique)
    return sorted(techniques, key=lambda t: t.order)


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    source = recipe.model.tokenizer or recipe.model.name_or_path
    path = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    _require_local(source, path)
    if is_builtin(source):
        return get_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise RecipeError(
            path,
            f"no tokenizer at {source!r} ({type(e).__name__}); give a local folder "
            "with tokenizer files, or a builtin: model",
        ) from None
    if tokenizer.pad_token is None:  # e.g. GPT-2 style tokenizers: pad with EOS (labels are -100 there anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _require_local(name: str, path: str) -> None:
    """A path-like name that does not exist is a typo, not a hub id: say so before anything tries the hub."""
    if not is_builtin(name) and not Path(name).exists() and name.startswith((".", "/", "~", "runs/")):
        raise RecipeError(path, f"folder not found: {name}")


def load_config(recipe: Recipe, tokenizer):
    from transformers import AutoConfig

    name = recipe.model.name_or_path
    if is_builtin(name):
        config = builtin_config(strip_builtin(name), tokenizer)
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as e:
            allowed = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
            raise RecipeError(
                "model.name_or_path",
                f"{name!r} is neither a local model folder nor reachable on the "
                f"hub ({type(e).__name__}); builtin models: {allowed}",
            ) from None
    for key, value in recipe.model.config_overrides.items():
        if not hasattr(config, key):
            raise RecipeError(f"model.config_overrides.{key}", f"not a field of {type(config).__name__}")
        setattr(config, key, value)
    return config


def infer_task(recipe: Recipe, config, columns: list[str]) -> str:
    """``model.task`` if given, else from the data's columns and the model's ``architectures``."""
    if recipe.model.task != "auto":
        return recipe.model.task
    d = recipe.data
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForSequenceClassification") or d.label_field in columns and d.text_field in columns:
        return "classification"
    if d.prompt_field in columns and d.response_field in columns:
        return "seq2seq" if config.is_encoder_decoder else "sft"
    if arch.endswith("ForMaskedLM"):
        return "masked_lm"
    if config.is_encoder_decoder:
        return "seq2seq"
    return "causal_lm"


def load_model(recipe: Recipe, config, task: str, kwargs: dict[str, Any]):
    import transformers

    auto = getattr(transformers, TASK_AUTO_CLASS[task])
    name = recipe.model.name_or_path
    if is_builtin(name):
        return auto.from_config(config, **kwargs)
    return auto.from_pretrained(name, config=config, **kwargs)


def make_training_args(recipe: Recipe, techniques: list[Technique]):
    import torch
    from transformers import TrainingArguments

    values = {**TRAINING_DEFAULTS, **recipe.training}
    if not torch.cuda.is_available():  # pinned memory only helps host-to-GPU copies
        values.setdefault("dataloader_pin_memory", False)
    try:
        args = TrainingArguments(**values)
    except (ValueError, TypeError) as e:
        raise RecipeError("training", str(e).strip().splitlines()[0]) from None
    for t in techniques:
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

    with args.main_process_first(desc="load and tokenize data"):
        raw = data_mod.load_source(recipe.data.train, "data.train")
        task = infer_task(recipe, config, raw["train"].column_names)
        eval_raw = data_mod.load_source(recipe.data.eval, "data.eval") if recipe.data.eval else None
        train_split = raw["train"]
        eval_split = (eval_raw or {}).get("train") if eval_raw else raw.get("validation")
        cols = data_mod.task_columns(task, recipe.data, train_split.column_names)
        data_mod.require_columns(train_split, cols, recipe.data.train)
        if task == "classification":
            splits, names = data_mod.encode_labels(_as_dict(train_split, eval_split), recipe.data.label_field)
            train_split, eval_split = splits["train"], splits.get("eval")
            config.num_labels = recipe.model.num_labels or len(names)
            config.id2label = dict(enumerate(names))
            config.label2id = {n: i for i, n in enumerate(names)}
            config.pad_token_id = tokenizer.pad_token_id
        if eval_split is not None:
            data_mod.require_columns(eval_split, cols, recipe.data.eval or recipe.data.train)
        train_split = _head(train_split, recipe.data.max_train_samples)
        eval_split = _head(eval_split, recipe.data.max_eval_samples)
        train_dataset = data_mod.tokenize(train_split, task, tokenizer, recipe.data)
        eval_dataset = data_mod.tokenize(eval_split, task, tokenizer, recipe.data) if eval_split else None
        for t in techniques:
            train_dataset = t.on_dataset(train_dataset, tokenizer)

    if eval_dataset is None and args.eval_strategy != "no":
        raise RecipeError(
            "training.eval_strategy", "needs an evaluation set: set data.eval, or use a source with a validation split"
        )

    kwargs: dict[str, Any] = {}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.model.dtype:
        kwargs["dtype"] = recipe.model.dtype
    for t in techniques:
        kwargs = t.model_kwargs(kwargs)
    model = load_model(recipe, config, task, kwargs)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise RecipeError(
            "model.tokenizer",
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding "
            f"has {vocab}: use the tokenizer the model was trained with",
        )
    for t in techniques:
        model = t.on_model(model)

    collator = data_mod.make_collator(task, tokenizer, model)
    for t in techniques:
        collator = t.collator(collator)

    trainer = EffTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        techniques=techniques,
    )
    return Built(recipe, task, techniques, tokenizer, model, train_dataset, eval_dataset, collator, args, trainer)


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
