"""Parameter-efficient tuning through Hugging Face PEFT: LoRA and its variants, (IA)^3, prefix tuning.

Survey (Zhuang et al. 2023, arXiv 2302.01107), "Memory efficiency / Parameter-efficient tuning": freeze the base
weights and train a small number of added parameters, so gradients and optimizer state exist only for those.

- LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen Linear ``W`` gets ``h = W x + (alpha / r) * B A x`` with
  ``A`` (r x in) random, ``B`` (out x r) zero at init: ``r * (in + out)`` trainable parameters per layer.
- rsLoRA (Kalajdzievski 2023, arXiv 2312.03732): scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
- DoRA (Liu et al. 2024, arXiv 2402.09353): ``W' = m * (W + s B A) / ||W + s B A||_c``, a trainable magnitude
  ``m`` (one per output feature) times the LoRA-updated direction.
- LoRA+ (Hayou et al. 2024, arXiv 2402.12354): the B matrices learn at ``lr * loraplus_lr_ratio``.
- (IA)^3 (Liu et al. 2022, arXiv 2205.05638): learned vectors that rescale keys, values and FFN activations.
- Prefix tuning (Li & Liang 2021, arXiv 2101.00190): trainable key/value prefixes in every attention layer.

Everything is built with PEFT's own configs (``LoraConfig(use_dora=..., use_rslora=...)``, ``IA3Config``,
``PrefixTuningConfig``), ``get_peft_model`` and ``peft.optimizers.create_loraplus_optimizer``. Inside this module
``import peft`` is the PyPI package (imports are absolute). Functional core for the stock Trainer:
``apply_peft(model, method="lora", r=8)``, ``LoraPlusFactory`` (``Trainer(optimizer_cls_and_kwargs=...)``),
``merge_and_save(model, folder)`` / ``MergeAndSaveCallback`` (``core/merge.py``: the base is reloaded, not copied).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainerCallback, TrainingArguments

from ..builtins import is_builtin
from ..core.merge import MERGED_DIR, merge_model
from ..core.registry import register_technique
from ..core.technique import ORDER_ADAPTER, Env, Technique, TechniqueConfig
from ..errors import MissingDependencyError, RecipeError
from ..runtime.distributed import recipe_optimizer_problem

logger = logging.getLogger(__name__)

METHODS = ("lora", "dora", "rslora", "loraplus", "ia3", "prefix_tuning")
LORA_METHODS = frozenset({"lora", "dora", "rslora", "loraplus"})
# Which method each method-specific field belongs to; giving it to another method is a recipe error.
FIELD_METHODS: dict[str, frozenset[str]] = {
    "r": LORA_METHODS,
    "lora_alpha": LORA_METHODS,
    "lora_dropout": LORA_METHODS,
    "target_modules": LORA_METHODS | {"ia3"},
    "modules_to_save": LORA_METHODS | {"ia3"},
    "feedforward_modules": frozenset({"ia3"}),
    "loraplus_lr_ratio": frozenset({"loraplus"}),
    "num_virtual_tokens": frozenset({"prefix_tuning"}),
}
DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "loraplus_lr_ratio": 16.0}
DEFAULT_VIRTUAL_TOKENS = 20


# ---- functional core ---------------------------------------------------------------------------------------
def task_type_of(model: torch.nn.Module) -> str | None:
    """PEFT's TaskType for a transformers model, from transformers' own auto-class mappings (None: a generic
    PeftModel, e.g. masked LM)."""
    from transformers.models.auto import modeling_auto as auto

    mappings = {
        "CAUSAL_LM": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "SEQ_2_SEQ_LM": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "SEQ_CLS": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "TOKEN_CLS": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "QUESTION_ANS": auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    }
    name = type(model).__name__
    for task_type, mapping in mappings.items():
        for value in mapping.values():
            if name in ((value,) if isinstance(value, str) else tuple(value)):
                return task_type
    return None


def adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-component names of the layers LoRA/IA3 can adapt (Linear, Embedding, Conv, GPT-2 Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, kinds)))


def check_module_names(model: torch.nn.Module, names: list[str], path: str) -> None:
    """Each name must match a module as PEFT matches a list entry: the full name or a ``.``-suffix of one."""
    all_names = [n for n, _ in model.named_modules() if n]
    missing = [key for key in names if not any(n == key or n.endswith("." + key) for n in all_names)]
    if missing:
        valid = adaptable_module_names(model)
        shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
        raise RecipeError(path, f"not found in {type(model).__name__}: {', '.join(missing)}; valid names: {shown}")


def ia3_feedforward_default(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """PEFT's feed-forward modules for this architecture that are among ``targets`` (IA3 requires a subset)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return [m for m in FEEDFORWARD.get(model_type, []) if m in targets]


def make_peft_config(
    method: str,
    task_type: str | None,
    *,
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
    feedforward_modules: list[str] | None = None,
    num_virtual_tokens: int = DEFAULT_VIRTUAL_TOKENS,
):
    """The PEFT config object for ``method`` (LoRA+ is plain LoRA here; its difference is the optimizer)."""
    import peft

    if method in LORA_METHODS:
        return peft.LoraConfig(
            task_type=task_type,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            modules_to_save=modules_to_save,
            use_dora=method == "dora",
            use_rslora=method == "rslora",
        )
    if method == "ia3":
        return peft.IA3Config(
            task_type=task_type,
            target_modules=target_modules,
            feedforward_modules=feedforward_modules,
            modules_to_save=modules_to_save,
        )
    if method == "prefix_tuning":
        if task_type is None:
            raise RecipeError("method", "prefix_tuning needs a causal LM, seq2seq or classification model")
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    raise RecipeError("method", f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def apply_peft(
    model: torch.nn.Module, method: str = "lora", path: str = "", revision: str | None = None, **fields: Any
):
    """Wrap ``model`` with ``get_peft_model``: base weights frozen, only the adapters (and modules_to_save) train.
    ``revision`` (the base's hub revision) is recorded in adapter_config.json, so the base reloads at that commit.

    Target and modules_to_save names are checked against the model first (PEFT silently ignores a list entry
    that matches nothing when another entry matches).
    """
    import peft

    prefix = f"{path}." if path else ""
    for key in ("target_modules", "modules_to_save", "feedforward_modules"):
        if isinstance(fields.get(key), list):
            check_module_names(model, fields[key], prefix + key)
    if (
        method == "ia3"
        and isinstance(fields.get("target_modules"), list)
        and fields.get("feedforward_modules") is None
    ):
        fields["feedforward_modules"] = ia3_feedforward_default(model, fields["target_modules"])
    task_type = task_type_of(model)
    config = make_peft_config(method, task_type, **fields)
    try:
        return peft.get_peft_model(model, config, revision=revision)
    except ValueError as e:  # e.g. no default target modules for an architecture PEFT does not know
        message = str(e).strip().splitlines()[0]
        raise RecipeError(prefix + "target_modules", f"{message} (try target_modules: all-linear)") from None


def lora_scaling(model: torch.nn.Module) -> dict[str, float]:
    """Per adapted layer name: the scaling PEFT applies to ``B A x`` (alpha/r, or alpha/sqrt(r) for rsLoRA)."""
    from peft.tuners.lora import LoraLayer

    return {n: float(m.scaling["default"]) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class LoraPlusFactory:
    """transformers' optimizer-factory protocol (``Trainer.create_optimizer`` calls ``LoraPlusFactory()(model,
    **kwargs)``): PEFT's ``create_loraplus_optimizer`` with the optimizer class ``training.optim`` names (AdamW,
    bitsandbytes 8-bit or paged AdamW, ...), B matrices at ``lr * loraplus_lr_ratio``."""

    def __call__(
        self,
        model: torch.nn.Module,
        *,
        args: TrainingArguments,
        lr: float,
        loraplus_lr_ratio: float,
        weight_decay: float = 0.0,
    ) -> torch.optim.Optimizer:
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        return create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=lr,
            loraplus_lr_ratio=loraplus_lr_ratio,
            loraplus_weight_decay=weight_decay,
            **kwargs,
        )


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_numel") or isinstance(p, DTensor) for p in model.parameters())


def merge_and_save(
    model: torch.nn.Module, folder: str | Path, tokenizer: Any = None, dtype: str = "auto"
) -> Path | None:
    """Save ``base + adapters`` merged into a plain transformers model (``from_pretrained``-loadable).

    ``core.merge.merge_model``: the adapter is saved, the base reloaded unquantized on the CPU (a QLoRA base merges
    into its original weights) and merged there; ``model`` is not copied and keeps training, evaluating and saving
    its adapter afterwards. Returns None (and logs) for ZeRO-3 / FSDP-sharded parameters.
    """
    if _sharded(model):
        logger.warning("peft merge_and_save: parameters are sharded (ZeRO-3 / FSDP); run hf-efftrain merge RUN_DIR")
        return None
    return merge_model(model, folder, dtype=dtype, tokenizer=tokenizer)


class MergeAndSaveCallback(TrainerCallback):
    """At train end (main process), ``merge_and_save`` the trained model to ``output_dir/<subdir>``."""

    def __init__(self, subdir: str = MERGED_DIR, dtype: str = "auto"):
        self.subdir, self.dtype = subdir, dtype
        self.saved_to: Path | None = None

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.saved_to = merge_and_save(model, Path(args.output_dir) / self.subdir, processing_class, self.dtype)
        return control


# ---- the technique -----------------------------------------------------------------------------------------
class PeftConfig(TechniqueConfig):
    name: Literal["peft"] = "peft"
    method: Literal[METHODS] = Field("lora", description="lora | dora | rslora | loraplus | ia3 | prefix_tuning.")
    r: int | None = Field(None, ge=1, description="LoRA rank (LoRA family; default 8).")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; scaling alpha/r (rsLoRA alpha/sqrt(r)).")
    lora_dropout: float | None = Field(None, ge=0, lt=1, description="Dropout on the LoRA input (default 0).")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names (full or suffix) or 'all-linear'; default: PEFT's per-architecture list."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (a classifier head is added for you)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="IA3: targets whose input (not output) is rescaled; default: PEFT's, within targets."
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices learn at lr * ratio (default 16, the paper's 2^4)."
    )
    num_virtual_tokens: int | None = Field(None, ge=1, description="Prefix tuning: prefix length (default 20).")
    merge_and_save: bool = Field(
        False, description="Also save base + adapters merged, loadable by from_pretrained, to output_dir/merged."
    )


@register_technique
class PeftTechnique(Technique):
    """Wraps the model with PEFT in ``on_model``; LoRA+ builds its optimizer; optional merged save at train end."""

    name = "peft"
    Config = PeftConfig
    survey_section = "Memory efficiency / Parameter-efficient tuning"
    paper = (
        "Hu et al. 2021, LoRA, arXiv 2106.09685; Liu et al. 2024, DoRA, arXiv 2402.09353; Kalajdzievski 2023, "
        "rsLoRA, arXiv 2312.03732; Hayou et al. 2024, LoRA+, arXiv 2402.12354; Liu et al. 2022, (IA)^3, "
        "arXiv 2205.05638; Li & Liang 2021, prefix tuning, arXiv 2101.00190"
    )
    order = ORDER_ADAPTER

    config: PeftConfig

    def __init__(self, config: PeftConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._merge_callback: MergeAndSaveCallback | None = None
        self._summary: dict[str, Any] = {}

    @classmethod
    def status(cls) -> str:
        from ..core.technique import has_package

        return "ready" if has_package("peft") else "needs peft"

    def fields(self) -> dict[str, Any]:
        """The method's PEFT fields with this technique's defaults filled in."""
        c, out = self.config, {}
        for key, methods in FIELD_METHODS.items():
            if c.method in methods:
                value = getattr(c, key)
                out[key] = DEFAULTS.get(key) if value is None else value
        if c.method == "prefix_tuning" and out["num_virtual_tokens"] is None:
            out["num_virtual_tokens"] = DEFAULT_VIRTUAL_TOKENS
        out.pop("loraplus_lr_ratio", None)  # an optimizer setting, not a PEFT config field
        return {k: v for k, v in out.items() if v is not None}

    def validate(self, recipe: Any, env: Env) -> None:
        c = self.config
        if "peft" not in env.installed:
            raise MissingDependencyError("name", "peft", "all")
        wrong = [k for k, methods in FIELD_METHODS.items() if getattr(c, k) is not None and c.method not in methods]
        if wrong:
            key = wrong[0]
            allowed = " | ".join(m for m in METHODS if m in FIELD_METHODS[key])
            raise RecipeError(key, f"only used with method: {allowed} (method is {c.method!r}); remove it")
        if c.merge_and_save and c.method == "prefix_tuning":
            raise RecipeError("merge_and_save", "prefix tuning adds tokens, there is nothing to merge; remove it")
        if c.merge_and_save and is_builtin(recipe.model.name_or_path):
            raise RecipeError(
                "merge_and_save",
                "merging reloads the base from its weights; a builtin: model has none (save it first)",
            )
        if recipe.model.from_scratch and not is_builtin(recipe.model.name_or_path):
            # The adapter would record name_or_path as its base, whose pretrained weights are not what it trained on.
            raise RecipeError(
                "", "adapters train on a frozen pretrained base; model.from_scratch builds it with random weights"
            )
        if c.method == "prefix_tuning" and recipe.model.task == "masked_lm":
            raise RecipeError("method", "prefix_tuning needs a causal LM, seq2seq or classification model")
        problem = (
            recipe_optimizer_problem(env.distributed_type, env.deepspeed_config) if c.method == "loraplus" else None
        )
        if problem:
            raise RecipeError("method", f"loraplus: {problem}")
        names = recipe.technique_names()
        self._path = f"techniques[{names.index(self.name)}]" if self.name in names else ""
        self._revision = recipe.model.revision
        self._merge_dtype = recipe.model.dtype or "auto"

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        revision = getattr(self, "_revision", None)
        model = apply_peft(
            model, self.config.method, path=getattr(self, "_path", ""), revision=revision, **self.fields()
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self._summary = {"task_type": task_type_of(model.get_base_model()), "params_adapter": trainable}
        logger.info("peft %s: %d of %d parameters train (%.3f%%)", self.config.method, trainable, total,
                    100 * trainable / max(total, 1))  # fmt: skip
        return model

    def optimizer_cls_and_kwargs(self, args: TrainingArguments) -> tuple[type, dict[str, Any]] | None:
        c = self.config
        if c.method != "loraplus":
            return None
        ratio = c.loraplus_lr_ratio if c.loraplus_lr_ratio is not None else DEFAULTS["loraplus_lr_ratio"]
        kwargs = {
            "args": args,
            "lr": args.learning_rate,
            "loraplus_lr_ratio": ratio,
            "weight_decay": args.weight_decay,
        }
        return LoraPlusFactory, kwargs

    def callbacks(self) -> list[TrainerCallback]:
        if not self.config.merge_and_save:
            return []
        self._merge_callback = MergeAndSaveCallback(dtype=getattr(self, "_merge_dtype", "auto"))
        return [self._merge_callback]

    def report(self) -> dict[str, Any]:
        out = dict(self._summary)
        if self._merge_callback is not None and self._merge_callback.saved_to is not None:
            out["merged_model"] = str(self._merge_callback.saved_to)
        return out
