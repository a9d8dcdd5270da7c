"""Per-architecture layer policies and the patch/undo helper."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BartForConditionalGeneration,
)

from hf_efftrain import RecipeError
from hf_efftrain.builtins import builtin_config, get_tokenizer
from hf_efftrain.core.layers import layer_stacks
from hf_efftrain.core.patching import Patches, patch_attr


@pytest.mark.parametrize(
    ("name", "auto", "expected"),
    [
        ("tiny-llama", AutoModelForCausalLM, {"decoder": 4}),
        ("tiny-gpt2", AutoModelForCausalLM, {"decoder": 4}),
        ("tiny-bert", AutoModelForMaskedLM, {"encoder": 4}),
        ("tiny-bert", AutoModelForSequenceClassification, {"encoder": 4}),
        ("tiny-t5", AutoModelForSeq2SeqLM, {"encoder": 2, "decoder": 2}),
    ],
)
def test_layer_stacks_of_builtin_models(name, auto, expected):
    model = auto.from_config(builtin_config(name, get_tokenizer()))
    stacks = layer_stacks(model)
    assert {role: len(blocks) for role, blocks in stacks.items()} == expected
    assert all(isinstance(b, torch.nn.ModuleList) for b in stacks.values())


def test_bart_and_unsupported_models():
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=1,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
        )
    )
    assert {r: len(b) for r, b in layer_stacks(bart).items()} == {"encoder": 1, "decoder": 2}
    with pytest.raises(RecipeError, match=r"Linear is not supported here; supported: .*LlamaModel"):
        layer_stacks(torch.nn.Linear(2, 2))


def test_patch_and_undo_restore_the_original():
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    before = layer(x)
    patches = Patches()
    patches.add(patch_attr(layer, "forward", lambda inp: torch.zeros(2, 3)))
    patches.add(patch_attr(layer, "in_features", 99))
    assert torch.equal(layer(x), torch.zeros(2, 3)) and layer.in_features == 99
    patches.undo()
    assert "forward" not in vars(layer)  # the class's forward shows again, not a stored bound method
    assert torch.equal(layer(x), before) and layer.in_features == 3
    patches.undo()  # idempotent


def test_patching_a_parameter_restores_the_parameter():
    layer = torch.nn.Linear(3, 3)
    weight = layer.weight
    patch = patch_attr(layer, "weight", torch.nn.Parameter(torch.zeros(3, 3)))
    assert torch.equal(layer.weight, torch.zeros(3, 3))
    patch.undo()
    assert layer.weight is weight and "weight" in dict(layer.named_parameters())
