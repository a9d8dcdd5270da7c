"""The model card (``README.md``) written next to a run's weights: base model, task, data, techniques, the recipe
and the final metrics of ``run_report.json``.

The front matter is the Hub's model-card metadata (https://huggingface.co/docs/hub/model-cards), rendered by
``huggingface_hub.ModelCardData``: ``base_model`` plus ``base_model_relation`` (``adapter`` for a PEFT adapter,
``merge`` for an adapter merged into its base, ``finetune`` otherwise) and ``library_name: peft`` for an adapter,
as PEFT's own card does. ``base_model`` and ``datasets`` must be Hub ids there, so local paths and ``builtin:``
names appear in the text only.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml

from ..builtins import is_builtin

Kind = Literal["adapter", "merged", "full"]
CARD_FILE = "README.md"
RELATION = {"adapter": "adapter", "merged": "merge", "full": "finetune"}
PIPELINE = {
    "causal_lm": "text-generation",
    "sft": "text-generation",
    "preference": "text-generation",
    "reward": "text-classification",
    "classification": "text-classification",
    "masked_lm": "fill-mask",
    "seq2seq": "text2text-generation",
}
AUTO_SUFFIX = {  # transformers' AutoModelFor<suffix> / PEFT's AutoPeftModelFor<suffix>
    "causal_lm": "CausalLM",
    "sft": "CausalLM",
    "preference": "CausalLM",
    "reward": "SequenceClassification",
    "classification": "SequenceClassification",
    "seq2seq": "Seq2SeqLM",
    "masked_lm": "MaskedLM",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(name: Any) -> bool:
    """A name ``from_pretrained`` / ``load_dataset`` would look up on the Hub: not builtin:, not a local path, not
    one of ``datasets``' packaged builders (json, csv, parquet, ...)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if not isinstance(name, str) or is_builtin(name) or os.path.exists(name):
        return False
    return bool(_HUB_ID.fullmatch(name)) and name not in _PACKAGED_DATASETS_MODULES and ".." not in name


def data_sources(data: dict[str, Any], key: str) -> list[str]:
    """The source names of ``data.train`` / ``data.eval``: a string, or a list of ``{path, split, ...}``."""
    value = data.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [f"{s['path']}" + (f" ({s['split']})" if s.get("split") else "") for s in value if isinstance(s, dict)]


def _metadata(recipe: dict[str, Any], report: dict[str, Any], kind: Kind) -> str:
    from huggingface_hub import ModelCardData

    model, data = recipe.get("model", {}), recipe.get("data", {})
    base = model.get("name_or_path")
    hub_data = [s.split(" (")[0] for key in ("train", "eval") for s in data_sources(data, key)]
    fields: dict[str, Any] = {
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": PIPELINE.get(report.get("task", "")),
        "tags": ["hf_efftrain", *dict.fromkeys(t["name"] for t in recipe.get("techniques", []))],
        "datasets": list(dict.fromkeys(d for d in hub_data if is_hub_id(d))) or None,
    }
    if is_hub_id(base) and not model.get("from_scratch"):  # from_scratch: its architecture, none of its weights
        fields.update(base_model=base, base_model_relation=RELATION[kind])
    return ModelCardData(**{k: v for k, v in fields.items() if v is not None}).to_yaml()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _results(report: dict[str, Any]) -> list[str]:
    rows = [
        ("steps", report.get("steps")),
        ("train loss, first logged", report.get("train_loss_first")),
        ("train loss, final logged", report.get("train_loss_final")),
        ("train loss, mean", report.get("train_loss_mean")),
    ]
    skip = ("runtime", "per_second", "epoch")
    rows += [(k, v) for k, v in (report.get("eval") or {}).items() if not any(s in k for s in skip)]
    total, trained, device = report.get("params_total"), report.get("params_trainable"), report.get("device")
    rows += [
        ("tokens seen", report.get("tokens_seen")),
        ("tokens / s", report.get("tokens_per_second")),
        ("wall time (s)", report.get("wall_time_s")),
        ("parameters trained / total", f"{trained:,} / {total:,}" if total and trained is not None else None),
        ("devices", f"{report.get('world_size', 1)} x {device}" if device else None),
    ]
    lines = ["| metric | value |", "|---|---|"]
    return lines + [f"| {name} | {_fmt(value)} |" for name, value in rows if value is not None]


def _load_snippet(folder: str, report: dict[str, Any], kind: Kind) -> list[str]:
    suffix = AUTO_SUFFIX.get(report.get("task", ""), "CausalLM")
    if kind != "adapter":
        cls, module, extra = f"AutoModelFor{suffix}", "transformers", ""
    else:
        cls = "AutoPeftModel" if suffix == "MaskedLM" else f"AutoPeftModelFor{suffix}"
        module, extra = "peft", ""
        labels = (report.get("model_config") or {}).get("id2label")
        if suffix == "SequenceClassification" and labels:
            # PEFT rebuilds the base from its own config.json, which does not know this head's label count.
            extra = f", num_labels={len(labels)}"
            head = (report.get("data") or {}).get("classifier_head")
            if head == "re-initialized":  # the base's head is another size
                extra += ", ignore_mismatched_sizes=True"
    return ["```python", f"from {module} import {cls}", "", f'model = {cls}.from_pretrained("{folder}"{extra})', "```"]


def model_card(folder: str | Path, recipe: dict[str, Any], report: dict[str, Any], kind: Kind) -> str:
    """The README.md text for the weights in ``folder`` (``kind``: what those weights are)."""
    model, data = recipe.get("model", {}), recipe.get("data", {})
    base = str(model.get("name_or_path"))
    revision = f" at revision `{model['revision']}`" if model.get("revision") else ""
    where = " (Hub)" if is_hub_id(base) else " (local folder)" if os.path.exists(base) else ""
    what = {
        "adapter": "A PEFT adapter; the base model's weights are not in this folder.",
        "merged": "The PEFT adapter merged into its base model (a plain transformers model).",
        "full": "All weights of the trained model.",
    }[kind]
    techniques = [
        f"`{t['name']}`" + (f" ({', '.join(f'{k}={v}' for k, v in t.items() if k != 'name')})" if len(t) > 1 else "")
        for t in recipe.get("techniques", [])
    ]
    lines = [
        f"# {Path(folder).resolve().name}",
        "",
        "Trained with hf_efftrain (efficient training, Zhuang et al. 2023, arXiv 2302.01107) from the recipe below. "
        + what,
        "",
        f"- **Architecture** (from its config, fresh weights): `{base}`{revision}{where}"
        if model.get("from_scratch")
        else f"- **Base model:** `{base}`{revision}{where}",
        f"- **Task:** {report.get('task', model.get('task', 'auto'))}",
        f"- **Training data:** {', '.join(f'`{s}`' for s in data_sources(data, 'train')) or 'none'}",
        f"- **Evaluation data:** {', '.join(f'`{s}`' for s in data_sources(data, 'eval')) or 'see the recipe'}",
        f"- **Techniques:** {', '.join(techniques) or 'none (the stock Trainer loop)'}",
        "",
        "## Results",
        "",
        "From `run_report.json` of the run.",
        "",
        *_results(report),
        "",
        "## Use",
        "",
        *_load_snippet(str(folder), report, kind),
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        "```",
    ]
    versions = {k: v for k, v in (report.get("versions") or {}).items() if v}
    if versions:
        lines += ["", "## Framework versions", "", *(f"- {k} {v}" for k, v in versions.items())]
    return f"---\n{_metadata(recipe, report, kind)}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, recipe: dict[str, Any], report: dict[str, Any], kind: Kind) -> Path:
    """Write ``folder/README.md`` through a temporary file and a rename (a reader never sees half of it)."""
    path = Path(folder) / CARD_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(model_card(folder, recipe, report, kind))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
