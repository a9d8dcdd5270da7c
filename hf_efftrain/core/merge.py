"""Merge a trained PEFT adapter into its base model: ``hf-efftrain merge RUN_DIR`` and peft's ``merge_and_save``.

LoRA (Hu et al. 2021, arXiv 2106.09685, Sec. 4.1) folds its update into the frozen weight, ``W' = W + s B A``, so the
merged model is a plain transformers model with no extra latency. The base is reloaded from the adapter's
``base_model_name_or_path`` at its recorded ``revision``, unquantized, on the CPU, in ``dtype``; then PEFT does the
merge (``PeftModel.from_pretrained(base, adapter).merge_and_unload()``) and transformers the save. The trained model
is never copied: one that barely fit the GPU for training is not duplicated there. The folder is written under a
temporary name and renamed into place, so a ``merged`` folder that exists is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..runtime.checkpoint import writing
from ..runtime.model_card import write_model_card

logger = logging.getLogger(__name__)

MERGED_DIR = "merged"
DTYPES = ("auto", "float32", "bfloat16", "float16")
ADAPTER_CONFIG = "adapter_config.json"


def base_model_class(peft_config: Any):
    """The transformers class PEFT's own ``AutoPeftModelFor...`` would load the base with, from the adapter's task
    type (or, for a task-less adapter such as masked LM, the class PEFT recorded in ``auto_mapping``)."""
    import transformers
    from peft import auto as peft_auto

    task_type = getattr(peft_config, "task_type", None)
    if task_type is not None:
        peft_cls = peft_auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
        for auto in vars(peft_auto).values():
            if getattr(auto, "_target_peft_class", None) is peft_cls and getattr(auto, "_target_class", None):
                return auto._target_class
    mapping = getattr(peft_config, "auto_mapping", None) or {}
    if str(mapping.get("parent_library", "")).startswith("transformers"):
        return getattr(transformers, mapping["base_model_class"])
    raise RecipeError("RUN_DIR", f"cannot tell which model class the adapter's base is (task_type {task_type!r})")


def _base_config(base: str, revision: str | None, saved: dict[str, Any] | None):
    """The config the adapter was trained on: ``saved`` (run_report.json's ``model_config``: labels and
    ``config_overrides`` included) over the base's own, minus any load-time quantization; and whether its
    classifier head is another size than the base's (data/labels.py re-initialized it for the run's classes)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base, revision=revision)
    except Exception as e:  # OSError, ValueError: not a folder with a config.json, not reachable on the Hub
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise RecipeError(
            "RUN_DIR", f"cannot load the adapter's base model {base!r}: {type(e).__name__}: {first}"
        ) from None
    if getattr(config, "quantization_config", None):
        raise RecipeError("RUN_DIR", f"the base {base} is a quantized checkpoint; merge into its unquantized original")
    base_labels = getattr(config, "num_labels", None)
    if saved:
        config = type(config).from_dict({k: v for k, v in saved.items() if k != "quantization_config"})
    if hasattr(config, "quantization_config"):  # quantized at load time (QLoRA): reload the original weights
        del config.quantization_config
    return config, getattr(config, "num_labels", None) != base_labels


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    model_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Reload the base of the adapter in ``adapter_dir``, merge, and save the result to ``out_dir`` atomically."""
    from peft import PeftConfig, PeftModel

    if dtype not in DTYPES:
        raise RecipeError("--dtype", f"must be one of {', '.join(DTYPES)} (got {dtype!r})")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    base = peft_config.base_model_name_or_path
    if not base:
        raise RecipeError(
            "RUN_DIR",
            "the adapter records no base model: it was trained on a model built from config (builtin:), which has "
            "no weights to reload; train from a save_pretrained folder or a hub id to merge",
        )
    config, resized = _base_config(base, peft_config.revision, model_config)
    cls = base_model_class(peft_config)
    logger.info("merge: loading %s (%s, dtype %s) on the CPU", base, cls.__name__, dtype)
    # A resized classifier head's weights come from the adapter (modules_to_save), not the base.
    model = cls.from_pretrained(
        base, revision=peft_config.revision, config=config, dtype=dtype, ignore_mismatched_sizes=resized
    )
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        with writing(f"the merged model in {out_dir}", None, str(out_dir.parent)):
            merged.save_pretrained(staged)
            if tokenizer is not None:
                tokenizer.save_pretrained(staged)
            _replace_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    logger.info("merge: %s merged into %s, saved to %s", adapter_dir, base, out_dir)
    return out_dir


def _replace_dir(staged: Path, final: Path) -> None:
    """Rename ``staged`` to ``final``; a folder already there (an earlier merge) is swapped out, then deleted."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.replaced-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def merge_model(model: Any, out_dir: str | Path, *, dtype: str = "auto", tokenizer: Any = None) -> Path:
    """Merge a live ``PeftModel`` (e.g. at the end of training): its adapter is saved to a temporary folder (a few
    MB), then merged into a freshly loaded base, as ``hf-efftrain merge`` does; ``model`` itself is left as it is."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.adapter-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        config = model.get_base_model().config.to_dict()
        return merge_adapter(tmp, out_dir, dtype=dtype, model_config=config, tokenizer=tokenizer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_run(run_dir: str | Path, dtype: str = "auto", out_dir: str | Path | None = None) -> Path:
    """``hf-efftrain merge RUN_DIR``: the adapter saved in ``run_dir`` merged into ``run_dir/merged`` (or
    ``out_dir``), with the run's tokenizer and a model card built from its ``run_report.json``."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    if not (run_dir / ADAPTER_CONFIG).is_file():
        raise RecipeError(
            "RUN_DIR",
            f"{run_dir} has no {ADAPTER_CONFIG}: merge takes the output folder of a run with the peft technique",
        )
    report = _read_report(run_dir)
    tokenizer = None
    if (run_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    out = merge_adapter(
        run_dir,
        out_dir or run_dir / MERGED_DIR,
        dtype=dtype,
        model_config=report.get("model_config"),
        tokenizer=tokenizer,
    )
    if report.get("recipe"):
        write_model_card(out, report["recipe"], report, "merged")
    return out


def _read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run_report.json"
    if not path.is_file():
        logger.warning(
            "merge: %s has no run_report.json (unfinished run?); using the base model's own config", run_dir
        )
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecipeError("RUN_DIR", f"could not read {path}: {e}") from None
    return report if isinstance(report, dict) else {}
