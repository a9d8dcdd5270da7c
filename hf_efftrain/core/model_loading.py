"""The model of a recipe: its config (``config_overrides``), the ``from_pretrained`` / ``from_config`` keyword
arguments (launch, recipe, technique hooks), the model itself, and the checks around loading it (model folder,
weight files, tokenizer vs embedding size, loss normalisation). ``build.py`` and ``dry_run.py`` share them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..builtins import BUILTIN_MODELS, builtin_config, is_builtin, strip_builtin
from ..errors import RecipeError
from ..runtime.distributed import launch_model_kwargs
from .recipe import Recipe
from .technique import Technique, blamed

logger = logging.getLogger(__name__)

TASK_AUTO_CLASS = {
    "causal_lm": "AutoModelForCausalLM",
    "sft": "AutoModelForCausalLM",
    "preference": "AutoModelForCausalLM",
    "reward": "AutoModelForSequenceClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
}


def check_model_folder(name: str) -> None:
    """A local model folder holds a readable config.json (what save_pretrained writes): say so before a tokenizer
    or config loader fails in its own words."""
    config = Path(name) / "config.json"
    if is_builtin(name) or not Path(name).is_dir():
        return
    if not config.is_file():  # also a FIFO or device named config.json, which would block a reader
        raise RecipeError(
            "model.name_or_path", f"{name} has no config.json; a model folder is what save_pretrained writes"
        )
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise RecipeError("model.name_or_path", f"could not read {config}: {_first_line(e)}") from None


def load_config(recipe: Recipe, tokenizer):
    from transformers import AutoConfig

    name = recipe.model.name_or_path
    if is_builtin(name):
        config = builtin_config(strip_builtin(name), tokenizer)
    elif Path(name).is_dir():
        check_model_folder(name)
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as e:  # malformed config.json: one line naming the file
            raise RecipeError("model.name_or_path", f"could not read {name}/config.json: {_first_line(e)}") from None
    else:
        try:
            config = AutoConfig.from_pretrained(name, revision=recipe.model.revision)
        except Exception as e:
            allowed = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
            raise RecipeError(
                "model.name_or_path",
                f"{name!r} is neither a local model folder nor reachable on the "
                f"hub ({type(e).__name__}); builtin models: {allowed}",
            ) from None
    overrides = recipe.model.config_overrides
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise RecipeError(f"model.config_overrides.{key}", f"not a field of {type(config).__name__}")
        setattr(config, key, value)
    return _consistent(config, overrides) if overrides else config


def _consistent(config, overrides: dict[str, Any]):
    """The config after ``config_overrides``, checked as ``save_pretrained`` will check it at the end of the run.
    ``layer_types`` (Qwen2, Gemma 2/3, ...: one entry per layer) is derived again by the config class when only the
    depth is overridden, as the class derives it for a fresh config of that depth."""
    types = getattr(config, "layer_types", None)
    depth = getattr(config, "num_hidden_layers", None)
    if "layer_types" not in overrides and isinstance(types, list) and len(types) != depth:
        fields = config.to_dict()
        del fields["layer_types"]
        config = type(config).from_dict(fields)
    try:
        config.validate()  # transformers' own checks of the config class (strict dataclass validators)
    except AttributeError:  # a config class without them
        pass
    except Exception as e:
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise RecipeError("model.config_overrides", f"{type(config).__name__} refuses these values: {last}") from None
    return config


def load_model(recipe: Recipe, config, task: str, kwargs: dict[str, Any]):
    import transformers

    auto = getattr(transformers, TASK_AUTO_CLASS[task])
    name = recipe.model.name_or_path
    if not recipe.model.loads_weights():  # builtin: or model.from_scratch: the architecture, fresh weights
        if not is_builtin(name):
            logger.info("model: %s built from its config with fresh weights (model.from_scratch)", name)
        return auto.from_config(config, **from_config_kwargs(kwargs))
    if Path(name).is_dir():
        check_weight_files(Path(name))
    try:
        if not kwargs.get("ignore_mismatched_sizes"):
            return auto.from_pretrained(name, config=config, revision=recipe.model.revision, **kwargs)
        model, info = auto.from_pretrained(
            name, config=config, revision=recipe.model.revision, output_loading_info=True, **kwargs
        )
    except OSError as e:  # no weights file in the folder, or one that cannot be read
        raise RecipeError("model.name_or_path", f"could not load the weights of {name}: {_first_line(e)}") from None
    _only_the_head_resized(model, info)
    return model


def _only_the_head_resized(model, info: dict[str, Any]) -> None:
    """``ignore_mismatched_sizes`` is asked for a classifier head resized to the data's classes (data/labels.py);
    a weight of the body with another shape (a width in ``config_overrides``) must not be re-initialized silently."""
    prefix = f"{model.base_model_prefix}."
    head = {n for n, _ in model.named_parameters() if not n.startswith(prefix)}
    body = sorted(k for k, *_ in info.get("mismatched_keys", ()) if k not in head)
    if body:
        raise RecipeError(
            "model.config_overrides",
            f"weights of {model.name_or_path} would change shape ({', '.join(body[:3])}); override the shapes of a "
            "pretrained model only with model.from_scratch: true",
        )


# What ``from_config`` takes of the load-time keyword arguments; the others exist for ``from_pretrained`` only.
FROM_CONFIG_KWARGS = ("attn_implementation", "dtype")


def from_config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` as ``from_config`` takes them: from_pretrained-only keys dropped, and ``dtype: auto`` (the
    checkpoint's dtype, which a config alone may not name) left to the config."""
    out = {k: v for k, v in kwargs.items() if k in FROM_CONFIG_KWARGS}
    if out.get("dtype") == "auto":
        del out["dtype"]
    return out


def check_weight_files(folder: Path) -> None:
    """Read the header of each safetensors file, so a truncated or corrupt one is named before loading starts."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # SafetensorError, OSError: the file is not what its name says
            raise RecipeError(
                "model.name_or_path", f"{f} is not a readable safetensors file ({_first_line(e)})"
            ) from None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def model_kwargs(recipe: Recipe, techniques: list[Technique]) -> dict[str, Any]:
    """``from_pretrained`` / ``from_config`` keyword arguments: the launch's (tensor parallel), the recipe's, then
    each technique's ``model_kwargs`` hook."""
    kwargs: dict[str, Any] = launch_model_kwargs(
        recipe.model.name_or_path, from_config=not recipe.model.loads_weights()
    )
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.model.dtype:
        kwargs["dtype"] = recipe.model.dtype
    for t in techniques:
        with blamed(recipe, t):
            kwargs = t.model_kwargs(kwargs)
    return kwargs


def check_vocab(model, tokenizer) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise RecipeError(
            "model.tokenizer",
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding "
            f"has {vocab}: use the tokenizer the model was trained with",
        )


def declare_loss_kwargs(model) -> None:
    """Tell the Trainer whether the model's loss honours ``num_items_in_batch``.

    The Trainer assumes any ``forward(**kwargs)`` normalises its loss by ``num_items_in_batch`` and then skips the
    division by the gradient-accumulation steps (and multiplies by the process count under DDP). Models that compute
    ``CrossEntropyLoss()`` themselves (BERT, T5, BART heads in transformers 5) ignore that argument, so their
    gradients would come out ``accumulation steps x processes`` times too large. Those that call
    ``self.loss_function`` do honour it.
    """
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
    if hasattr(type(inner), "accepts_loss_kwargs"):
        return  # the model class says so itself
    try:
        source = inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return
    if "loss_function" not in source and "num_items_in_batch" not in source:
        inner.accepts_loss_kwargs = False
