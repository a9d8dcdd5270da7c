"""``model.from_scratch``: a saved (or hub) architecture built from its config with fresh weights, for pre-training;
the initializations that replace weights (t_fixup, fixup, deepnorm) and progressive stacking (which truncates the
model) are refused on pretrained ones; config_overrides of the depth keep a per-layer ``layer_types`` consistent
(Qwen2, Gemma 2) instead of failing at the final save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_efftrain.builtins import get_tokenizer
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.model_loading import load_config
from hf_efftrain.core.recipe import Recipe
from hf_efftrain.errors import RecipeError


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    """A 4-layer Qwen2 saved with save_pretrained (its config lists 4 layer_types), with the builtin tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = get_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("qwen") / "model"
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _recipe(tiny_recipe, folder: Path, techniques=(), **model) -> Recipe:
    m = {"name_or_path": str(folder), "config_overrides": {}, **model}
    return Recipe.parse(tiny_recipe(model=m, techniques=list(techniques)))


def _embedding(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().clone()


def test_from_scratch_builds_the_architecture_with_fresh_seeded_weights(qwen_folder, tiny_recipe):
    from safetensors.torch import load_file

    saved = load_file(qwen_folder / "model.safetensors")["model.embed_tokens.weight"]
    pretrained = build(_recipe(tiny_recipe, qwen_folder)).model
    assert torch.equal(_embedding(pretrained), saved)

    scratch = build(_recipe(tiny_recipe, qwen_folder, from_scratch=True)).model
    again = build(_recipe(tiny_recipe, qwen_folder, from_scratch=True)).model
    assert type(scratch).__name__ == "Qwen2ForCausalLM" and scratch.config.num_hidden_layers == 4
    assert not torch.allclose(_embedding(scratch), saved)
    assert torch.equal(_embedding(scratch), _embedding(again))  # seeded by training.seed, like a builtin model


@pytest.mark.parametrize(
    "technique",
    [
        {"name": "t_fixup"},
        {"name": "fixup"},
        {"name": "deepnorm"},
        {"name": "progressive_stacking", "start_layers": 1},
    ],
)
def test_a_technique_that_discards_weights_is_refused_on_pretrained_weights(qwen_folder, tiny_recipe, technique):
    name = technique["name"]
    does = "truncates the model" if name == "progressive_stacking" else "re-initializes"
    with pytest.raises(RecipeError, match=rf"techniques\[0\]: {name} {does} .*model.from_scratch: true"):
        make_techniques(_recipe(tiny_recipe, qwen_folder, [technique]))
    make_techniques(_recipe(tiny_recipe, qwen_folder, [technique], from_scratch=True))
    make_techniques(Recipe.parse(tiny_recipe(techniques=[technique])))  # builtin: built from config already


def test_deepnorm_without_reinit_keeps_pretrained_weights_and_peft_needs_them(qwen_folder, tiny_recipe):
    make_techniques(_recipe(tiny_recipe, qwen_folder, [{"name": "deepnorm", "reinit": False}]))
    with pytest.raises(RecipeError, match=r"reinit: false"):
        make_techniques(_recipe(tiny_recipe, qwen_folder, [{"name": "deepnorm"}]))
    # An adapter on random weights would name the folder's pretrained weights as its base (merge would reload those).
    with pytest.raises(RecipeError, match=r"techniques\[0\]: adapters train on a frozen pretrained base"):
        make_techniques(_recipe(tiny_recipe, qwen_folder, [{"name": "peft"}], from_scratch=True))


def test_pretraining_from_scratch_at_another_depth_saves_and_reloads(qwen_folder, tiny_recipe, train_keeping_built):
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe(
        model={"name_or_path": str(qwen_folder), "from_scratch": True, "config_overrides": {"num_hidden_layers": 2}},
        techniques=[{"name": "t_fixup"}],
    )
    report, built = train_keeping_built(recipe)
    assert built.model.config.layer_types == ["full_attention"] * 2
    assert report["train_loss_final"] < report["train_loss_first"]
    out = Path(recipe["training"]["output_dir"])
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # before the fix, save_pretrained refused the config
    assert reloaded.config.num_hidden_layers == 2
    card = (out / "README.md").read_text()
    assert "**Architecture** (from its config, fresh weights)" in card and "Base model" not in card


def test_config_overrides_keep_layer_types_consistent_or_name_the_field(qwen_folder, tiny_recipe):
    tok = get_tokenizer()
    config = load_config(_recipe(tiny_recipe, qwen_folder, config_overrides={"num_hidden_layers": 3}), tok)
    assert config.layer_types == ["full_attention"] * 3 and config.hidden_size == 64
    bad = {"num_hidden_layers": 3, "layer_types": ["full_attention"]}
    with pytest.raises(RecipeError, match=r"model.config_overrides: Qwen2Config refuses these values: .*layer_types"):
        load_config(_recipe(tiny_recipe, qwen_folder, config_overrides=bad), tok)


def test_a_hooks_error_names_the_technique_entry(tiny_recipe):
    """A RecipeError raised in a build-time hook (here token_masking's collator on a causal-LM recipe) is reported
    under techniques[i], as validate's are; one about another section keeps that section's path."""
    recipe = Recipe.parse(tiny_recipe(techniques=[{"name": "lion"}, {"name": "token_masking"}]))
    with pytest.raises(RecipeError, match=r"^techniques\[1\]\.mode: mlm needs a masked-LM model"):
        build(recipe)
    packing_on_t5 = tiny_recipe(model={"name_or_path": "builtin:tiny-t5"}, techniques=[{"name": "packing"}])
    with pytest.raises(RecipeError, match=r"^model\.(task|name_or_path): packing"):
        build(Recipe.parse(packing_on_t5))
