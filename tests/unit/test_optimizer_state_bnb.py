"""The run report's ``optimizer_state_bytes`` counts the real 8-bit state of a bitsandbytes optimizer (issue 3):
an EffTrainer run with ``{name: optimizer, type: adamw_bnb_8bit}`` against ``adamw_torch`` on the same model."""

from __future__ import annotations

import pytest
import torch

from hf_efftrain import Recipe, train

BLOCK = 256  # bitsandbytes' block-wise quantization: one float32 absmax per 256 elements
QMAP_BYTES = 256 * 4  # each 8-bit state has a 256-entry float32 quantization map, shared by all tensors


def _run(tiny_recipe, optim: str) -> dict:
    recipe = tiny_recipe(training={"max_steps": 1}, techniques=[{"name": "optimizer", "type": optim}])
    return train(Recipe.parse(recipe))


def test_report_counts_real_8bit_adamw_state(tiny_recipe):
    pytest.importorskip("bitsandbytes")
    torch_report = _run(tiny_recipe, "adamw_torch")
    bnb_report = _run(tiny_recipe, "adamw_bnb_8bit")

    # Expected sizes from the model's shapes (tiny-llama, 2 layers, hidden 128, vocab 4096, untied lm_head).
    from transformers import AutoModelForCausalLM

    from hf_efftrain.builtins import builtin_config, get_tokenizer

    config = builtin_config("tiny-llama", get_tokenizer())
    config.num_hidden_layers = 2
    model = AutoModelForCausalLM.from_config(config)
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    params = list(model.parameters())
    # adamw_torch: two float32 moments and a float32 step counter per tensor.
    assert torch_report["optimizer_state_bytes"] == sum(8 * p.numel() + 4 for p in params)
    # adamw_bnb_8bit: uint8 moments + absmax for tensors of >= 4096 elements; float32 moments for smaller ones and
    # for nn.Embedding weights (the Trainer overrides those to 32 bits); the two shared quantization maps.
    expected = 2 * QMAP_BYTES
    for p in params:
        n = p.numel()
        if n >= 4096 and id(p) not in embeddings:
            expected += 2 * n + 2 * 4 * -(-n // BLOCK)
        else:
            expected += 8 * n
    assert bnb_report["optimizer_state_bytes"] == expected
    assert 0 < bnb_report["optimizer_state_bytes"] < 0.7 * torch_report["optimizer_state_bytes"]
