"""The ``model`` and ``data`` sections of a recipe: pydantic models, unknown keys rejected (docs/ARCHITECTURE.md,
"How a recipe field reaches the code that uses it"). ``recipe.py`` assembles them into a ``Recipe``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .recipe_checks import attn_implementation_problem

TASKS = ("auto", "causal_lm", "sft", "masked_lm", "seq2seq", "classification")


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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(None, description="weights' dtype")
    num_labels: int | None = Field(None, ge=2, description="classification; default: from the label column")

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str | None) -> str | None:
        problem = value and attn_implementation_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class DataSection(_Section):
    train: str = Field(description="builtin:<name>, a local json/jsonl/csv/parquet/txt file or folder, or a hub id")
    eval: str | None = Field(None, description="same forms as train; default: the train source's validation split")
    text_field: str = Field("text", description="column with the text (causal LM, masked LM, classification)")
    prompt_field: str = Field("prompt", description="SFT / seq2seq input column")
    response_field: str = Field("response", description="SFT / seq2seq target column")
    label_field: str = Field("label", description="classification label column")
    max_length: int = Field(256, ge=8, le=1_048_576, description="tokens per example (longer ones are truncated)")
    max_train_samples: int | None = Field(None, ge=1, description="keep the first N training examples")
    max_eval_samples: int | None = Field(None, ge=1, description="keep the first N evaluation examples")
