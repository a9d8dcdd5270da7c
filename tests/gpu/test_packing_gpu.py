"""On CUDA with flash-attn: packed rows go through flash_attn_varlen_func (cu_seq_lens from PackedCollator), so
each packed document's logits match the document run alone, for a batch of several rows. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efftrain import Recipe, train
from hf_efftrain.techniques.packing import PackedCollator, pack_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn"),
]

IMPL = "flash_attention_2"


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head dim 64
        num_key_value_heads=2,
        max_position_embeddings=256,
    )  # use_cache=True, the default
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation=IMPL, dtype=torch.bfloat16).cuda().train()


def test_flash_varlen_packed_documents_equal_documents_alone():
    g = torch.Generator().manual_seed(0)
    lengths = [37, 90, 12, 64, 100, 7, 55, 128, 21, 80]
    ids = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": ids}), 128)
    batch = PackedCollator(attn_implementation=IMPL)([packed[i] for i in range(len(packed))])
    assert batch["input_ids"].shape[0] > 1  # several rows: the case position_ids alone would not cover
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    model = _model()
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    worst = 0.0
    with torch.no_grad():
        for r, pos in enumerate(batch["position_ids"].tolist()):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for s, e in zip(starts, starts[1:]):
                if batch["labels"][r, s:e].eq(-100).all():
                    continue  # row padding
                alone = model(input_ids=batch["input_ids"][r : r + 1, s:e]).logits[0].float()
                worst = max(worst, float((out.logits[r, s:e].float() - alone).abs().max()))
    # bf16 kernels (varlen vs dense) differ by rounding; leaking attention moves logits by ~0.3 and more.
    assert worst < 3e-2


def test_packing_recipe_with_flash_attention(tmp_path):
    recipe = {
        "model": {"name_or_path": "builtin:tiny-llama", "attn_implementation": IMPL, "dtype": "bfloat16"},
        "data": {"train": "builtin:stdlib-docs", "max_length": 256, "max_train_samples": 256},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 5, "per_device_train_batch_size": 8},
        "techniques": [{"name": "packing"}],
    }
    report = train(Recipe.parse(recipe))
    facts = next(t["report"] for t in report["techniques"] if t["name"] == "packing")
    assert facts["attn_implementation"] == IMPL and facts["padding_fraction_after"] < facts["padding_fraction_before"]
    assert torch.isfinite(torch.tensor(report["train_loss_final"]))
