"""Shared fixtures for technique tests: a tiny Llama built from config, a learnable token dataset, and a
helper that runs a few real steps of the stock ``transformers.Trainer`` on the CPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

VOCAB = 128
SEQ_LEN = 16


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": False,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **model_kwargs: Any) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama; ``model_kwargs`` go to ``from_config`` (attn_implementation, dtype)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(tiny_llama_config(), **model_kwargs)


def token_rows(n: int = 32, seq_len: int = SEQ_LEN, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Counting sequences ``s, s+k, s+2k, ... (mod VOCAB)``: easy to learn, so a few steps lower the loss."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(3, VOCAB, (1,), generator=g))
        step = int(torch.randint(1, 4, (1,), generator=g))
        ids = (start + step * torch.arange(seq_len)) % (VOCAB - 3) + 3
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def training_args(output_dir: Path | str, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": "none",
        "max_steps": 4,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(
    model: torch.nn.Module,
    args: TrainingArguments,
    rows: list[dict[str, torch.Tensor]] | None = None,
    optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
) -> Trainer:
    """Run ``trainer.train()`` with the stock Trainer and return the trainer (losses in ``state.log_history``)."""
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows if rows is not None else token_rows(),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
    )
    trainer.train()
    return trainer


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture
def tiny(tmp_path: Path) -> SimpleNamespace:
    """The helpers above as one fixture (tests import nothing from conftest, whose module name is not unique):
    ``tiny.model(seed, **model_kwargs)``, ``tiny.rows(n)``, ``tiny.args(**overrides)`` (CPU, under tmp_path),
    ``tiny.train(model, args, rows=None, optimizer_cls_and_kwargs=None)``, ``tiny.losses(trainer)``."""
    return SimpleNamespace(
        model=tiny_llama,
        config=tiny_llama_config,
        rows=token_rows,
        args=lambda **overrides: training_args(tmp_path, **overrides),
        train=train,
        losses=losses,
    )
