"""The ``model`` and ``data`` sections of a recipe: pydantic models, unknown keys rejected (docs/ARCHITECTURE.md,
"How a recipe field reaches the code that uses it"). ``recipe.py`` assembles them into a ``Recipe``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, WrapValidator, field_validator

from .recipe_checks import attn_implementation_problem

TASKS = ("auto", "causal_lm", "sft", "preference", "reward", "masked_lm", "seq2seq", "classification")
DATA_FORMATS = ("auto", "text", "prompt_completion", "messages", "sharegpt", "preference")
LOSS_ON = ("assistant_only", "completion_only", "all")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    name_or_path: str = Field(description="builtin:<name>, a local save_pretrained folder, or a hub id")
    task: Literal[TASKS] = Field("auto", description="auto: inferred from the model's architecture and the data")
    tokenizer: str | None = Field(None, description="tokenizer path; default: the model's own (builtin models: ours)")
    config_overrides: dict[str, Any] = Field(default_factory=dict, description="model config fields to override")
    attn_implementation: str | None = Field(
        None,
        description="passed to from_pretrained / from_config: any name the installed transformers accepts (eager, "
        "sdpa, flash_attention_2, flex_attention, AttentionInterface registrations, hub kernels org/repo)",
    )
    revision: str | None = Field(
        None, min_length=1, description="hub branch, tag or commit of name_or_path (pin it: a hub repo can change)"
    )
    from_scratch: bool = Field(
        False,
        description="build name_or_path's architecture from its config with fresh weights (pre-training; its "
        "tokenizer is still used); builtin: models always are",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(None, description="weights' dtype")
    num_labels: int | None = Field(None, ge=2, description="classification; default: from the label column")
    chat_template: str | None = Field(
        None,
        min_length=1,
        description="set or override the tokenizer's chat template: a Jinja file, inline Jinja, or a name (chatml, "
        "llama3, gemma)",
    )

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value is None or "{{" in value or "{%" in value or _is_file(value):
            return value
        from ..builtins import CHAT_TEMPLATES  # only here: loading a recipe imports no datasets / tokenizers

        if value in CHAT_TEMPLATES:
            return value
        names = ", ".join(CHAT_TEMPLATES)
        raise ValueError(f"{value[:200]!r} is not a file, inline Jinja, or a named template ({names})")

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str | None) -> str | None:
        problem = value and attn_implementation_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("revision")
    @classmethod
    def _hub_revision(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A builtin: model is built from config; a revision there would be silently meaningless.
        if value is not None and str(info.data.get("name_or_path", "")).startswith("builtin:"):
            raise ValueError("a builtin: model has no revisions; remove it (revisions are for hub ids)")
        return value

    def loads_weights(self) -> bool:
        """True when training starts from name_or_path's pretrained weights (``from_pretrained``), False when the
        model is built from its config (``from_config``: a builtin: model, or ``from_scratch``)."""
        return not self.name_or_path.startswith("builtin:") and not self.from_scratch


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a file
        return False


class EvalSource(_Section):
    """One dataset of a list in ``data.eval``: the arguments of ``datasets.load_dataset`` (and the split to use)."""

    path: str = Field(
        min_length=1, description="builtin:<name>, a local file or folder, a hub id, or a builder (json)"
    )
    name: str | None = Field(None, min_length=1, description="the dataset's configuration (load_dataset's name)")
    split: str = Field("train", min_length=1, description="which split of the source to use")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="files (globs) inside the folder or hub repo; a mapping split -> files makes named splits"
    )
    revision: str | None = Field(None, min_length=1, description="hub branch, tag or commit")

    @field_validator("data_files", mode="before")
    @classmethod
    def _files(cls, value: Any) -> Any:
        # One message instead of one per member of the union (str, list, mapping).
        if (
            value is None
            or _is_files(value)
            or isinstance(value, dict)
            and value
            and all(isinstance(k, str) and _is_files(v) for k, v in value.items())
        ):
            return value
        raise ValueError("must be a file or glob, a list of them, or a mapping split -> file(s)")


def _is_files(value: Any) -> bool:
    return isinstance(value, str) or isinstance(value, list) and bool(value) and all(isinstance(f, str) for f in value)


class Source(EvalSource):
    """One dataset of a training mixture: ``weight`` is its share of the interleaved rows (normalised)."""

    weight: float = Field(1.0, gt=0, description="relative sampling weight in the mixture")


def _one_or_many(source: type[EvalSource]):
    """``data.train`` / ``data.eval``: a plain string (the simple form) or a list of source mappings. Validating the
    list on its own keeps error paths like ``data.train[1].weight`` free of pydantic's union branch names."""
    many, one = TypeAdapter(list[source]), TypeAdapter(str)

    def validate(value: Any, handler: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one source")
            return many.validate_python(value)
        if isinstance(value, dict):
            raise ValueError("a source is a string, or a list of {path, split, weight, ...} mappings")
        return None if value is None and source is EvalSource else one.validate_python(value)

    return validate


class DataSection(_Section):
    train: Annotated[str | list[Source], WrapValidator(_one_or_many(Source))] = Field(
        description="builtin:<name>, a local json/jsonl/csv/parquet/txt file or folder, or a hub id; or a list of "
        "sources {path, name, split, data_files, revision, weight}, interleaved by weight"
    )
    eval: Annotated[str | list[EvalSource] | None, WrapValidator(_one_or_many(EvalSource))] = Field(
        None, description="same forms as train (a list is concatenated); default: the train sources' validation splits"
    )
    eval_split: str | None = Field(None, description="a split of each train source to evaluate on (e.g. validation)")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="hold out this fraction of each train source (seeded) for evaluation"
    )
    text_field: str = Field("text", description="column with the text (causal LM, masked LM, classification)")
    prompt_field: str = Field("prompt", description="SFT / seq2seq input column")
    response_field: str = Field("response", description="SFT / seq2seq target column")
    label_field: str = Field("label", description="classification label column")
    chosen_field: str = Field("chosen", description="preference: the preferred response (text or turns)")
    rejected_field: str = Field("rejected", description="preference: the dispreferred response (text or turns)")
    margin_field: str = Field(
        "margin", description="reward: each pair's margin (Llama 2's m(r), TRL's column), used when the data has it"
    )
    max_length: int = Field(256, ge=8, le=1_048_576, description="tokens per example (longer ones are truncated)")
    max_train_samples: int | None = Field(None, ge=1, description="keep the first N training examples")
    max_eval_samples: int | None = Field(None, ge=1, description="keep the first N evaluation examples")
    format: Literal[DATA_FORMATS] = Field(
        "auto",
        description="auto: from the columns (chosen + rejected, messages, conversations, prompt + response, or text)",
    )
    messages_field: str | None = Field(
        None, min_length=1, description="messages / sharegpt: the column of turns (default messages / conversations)"
    )
    input_field: str = Field("input", description="prompt_completion: optional column joined to the prompt (alpaca)")
    loss_on: Literal[LOSS_ON] | None = Field(
        None,
        description="tokens with a loss; default assistant_only (messages, sharegpt), completion_only "
        "(prompt_completion), all (text)",
    )
    num_proc: int | None = Field(None, ge=1, le=512, description="processes for tokenization (datasets map)")

    @field_validator("eval_split", "eval_fraction")
    @classmethod
    def _one_eval_source(cls, value: Any, info: ValidationInfo) -> Any:
        # One way to name the evaluation data; two would leave it ambiguous which one runs.
        given = [f"data.{k}" for k in ("eval", "eval_split") if k != info.field_name and info.data.get(k) is not None]
        if value is not None and given:
            raise ValueError(f"cannot be combined with {given[0]}; give one of data.eval, eval_split, eval_fraction")
        return value
