"""runtime/model_card.py: the README.md next to a run's weights. Its front matter is what the Hub reads (base_model
and its relation, library_name, datasets: Hub ids only); its text has the base model, task, data, techniques, the
final metrics of the run report, how to load the weights, and the recipe itself."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from hf_efftrain.core.recipe import Recipe
from hf_efftrain.core.run import train
from hf_efftrain.runtime.model_card import is_hub_id, model_card, write_model_card

RECIPE = {
    "model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0" * 40},
    "data": {
        "train": [{"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}, {"path": "builtin:chat-synthetic"}],
        "eval": "json",
        "format": "messages",
    },
    "training": {"output_dir": "runs/x"},
    "techniques": [{"name": "peft", "r": 16}, {"name": "packing"}],
}
REPORT = {
    "task": "sft",
    "steps": 120,
    "train_loss_first": 2.5,
    "train_loss_final": 1.25,
    "eval": {"eval_loss": 1.375, "eval_runtime": 3.0},
    "params_total": 1000,
    "params_trainable": 10,
    "versions": {"transformers": "5.0", "peft": None},
}


def _recipe_block(text: str) -> dict:
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))


def test_hub_ids_and_what_is_not_one(tmp_path):
    assert is_hub_id("meta-llama/Llama-3.1-8B-Instruct") and is_hub_id("imdb")
    assert not is_hub_id("builtin:tiny-llama") and not is_hub_id("json") and not is_hub_id("../up/one")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id(None)


def test_adapter_card_front_matter_is_the_hubs(tmp_path):
    text = model_card(tmp_path, RECIPE, REPORT, "adapter")
    meta = ModelCard(text).data.to_dict()
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B-Instruct" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["HuggingFaceH4/ultrachat_200k"]  # builtin: and the json builder are not Hub data
    assert meta["tags"] == ["hf_efftrain", "peft", "packing"]
    assert f"at revision `{'0' * 40}`" in text and "`HuggingFaceH4/ultrachat_200k (train_sft)`" in text
    assert "| eval_loss | 1.375 |" in text and "| train loss, final logged | 1.25 |" in text
    assert "eval_runtime" not in text and "peft None" not in text  # timings and missing versions left out
    assert "from peft import AutoPeftModelForCausalLM" in text
    assert _recipe_block(text) == RECIPE


def test_merged_and_local_cards(tmp_path):
    local = {**RECIPE, "model": {"name_or_path": str(tmp_path)}}
    text = model_card(tmp_path, local, {**REPORT, "task": "classification"}, "merged")
    meta = ModelCard(text).data.to_dict()
    assert "base_model" not in meta and meta["library_name"] == "transformers"  # a local path is no Hub id
    assert f"`{tmp_path}` (local folder)" in text and "AutoModelForSequenceClassification" in text
    labels = {**REPORT, "task": "classification", "model_config": {"id2label": {"0": "a", "1": "b", "2": "c"}}}
    assert 'from_pretrained("x", num_labels=3)' in model_card("x", RECIPE, labels, "adapter")
    hub = ModelCard(model_card(tmp_path, RECIPE, REPORT, "merged")).data.to_dict()
    assert hub["base_model_relation"] == "merge"


def test_a_run_writes_its_card_next_to_the_weights(tiny_recipe, tmp_path):
    recipe = tiny_recipe(training={"max_steps": 2})
    report = train(Recipe.parse(recipe))
    out = Path(recipe["training"]["output_dir"])
    text = (out / "README.md").read_text()
    assert (out / "model.safetensors").is_file() and "All weights of the trained model." in text
    assert "builtin:tiny-llama" in text and f"| steps | {report['steps']} |" in text
    assert _recipe_block(text) == report["recipe"]
    assert not list(out.glob(".README.md.*"))  # no temporary file left
    write_model_card(out, report["recipe"], report, "full")  # rewriting replaces it whole
    assert (out / "README.md").read_text() == text
