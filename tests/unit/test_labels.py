"""Classification labels against the checkpoint's head (core/data/labels.py): a fine-tuned classifier's class ids are
kept when the data's classes are its own (matched by name, case-insensitively, or as integer ids), a head of another
size is re-initialized instead of failing in ``from_pretrained``, and ``model.num_labels`` sizes the head."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from hf_efftrain.builtins import get_tokenizer
from hf_efftrain.core.build import build
from hf_efftrain.core.recipe import Recipe


def _classifier(folder: Path, names: list[str] | None, num_labels: int = 2) -> Path:
    """A 1-layer BERT classifier saved with save_pretrained; ``names`` its id2label (None: HF's LABEL_i)."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = get_tokenizer()
    labels = {"id2label": dict(enumerate(names))} if names else {"num_labels": num_labels}
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                        **labels)  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _csv(path: Path, labels: list) -> Path:
    path.write_text("text,label\n" + "".join(f"row {i} says {v},{v}\n" for i, v in enumerate(labels)))
    return path


def _build(tiny_recipe, model: Path, data: Path, **model_fields):
    recipe = tiny_recipe(
        model={"name_or_path": str(model), "task": "classification", "config_overrides": {}, **model_fields},
        data={"train": str(data), "max_length": 16},
    )
    return build(Recipe.parse(recipe))


def _head(model) -> torch.Tensor:
    return model.classifier.weight.detach()


def test_the_checkpoints_class_ids_are_kept_when_the_data_names_its_classes(tmp_path, tiny_recipe):
    from safetensors.torch import load_file

    folder = _classifier(tmp_path / "clf", ["neg", "neutral", "pos"])
    # Sorted, the data's own names would be NEG, NEUTRAL, POS... and "POS" < "neutral": an order unlike the head's.
    data = _csv(tmp_path / "d.csv", ["POS", "NEG", "neutral", "POS", "NEG", "neutral"] * 4)
    built = _build(tiny_recipe, folder, data)
    assert built.model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert built.train_dataset["labels"][:3] == [2, 0, 1]  # POS -> pos's row 2, NEG -> 0, neutral -> 1
    assert torch.equal(_head(built.model), load_file(folder / "model.safetensors")["classifier.weight"])
    assert built.data_stats["classifier_head"] == "kept"


def test_integer_labels_index_the_checkpoints_rows_and_keep_its_names(tmp_path, tiny_recipe):
    folder = _classifier(tmp_path / "clf", ["NEGATIVE", "POSITIVE"])
    built = _build(tiny_recipe, folder, _csv(tmp_path / "d.csv", [0, 1] * 12))
    assert built.model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert built.train_dataset["labels"][:2] == [0, 1]


def test_a_head_of_another_size_is_re_initialized_not_a_crash(tmp_path, tiny_recipe, caplog):
    from safetensors.torch import load_file

    folder = _classifier(tmp_path / "clf", None)  # 2 rows, LABEL_0 / LABEL_1
    saved = load_file(folder / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        built = _build(tiny_recipe, folder, _csv(tmp_path / "d.csv", ["a", "b", "c"] * 8))
    assert _head(built.model).shape[0] == 3 and built.model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert "re-initialized" in caplog.text and built.data_stats["classifier_head"] == "re-initialized"
    encoder = built.model.bert.embeddings.word_embeddings.weight
    assert torch.equal(encoder, saved["bert.embeddings.word_embeddings.weight"])  # only the head is new


def test_other_class_names_keep_a_head_of_the_same_size_with_a_warning(tmp_path, tiny_recipe, caplog):
    folder = _classifier(tmp_path / "clf", ["cat", "dog"])
    with caplog.at_level(logging.WARNING):
        built = _build(tiny_recipe, folder, _csv(tmp_path / "d.csv", ["spam", "ham"] * 12))
    assert built.model.config.id2label == {0: "ham", 1: "spam"}
    assert "now stand for (ham, spam)" in caplog.text


@pytest.mark.parametrize("num_labels", [5])
def test_model_num_labels_sizes_the_head_beyond_the_datas_classes(tmp_path, tiny_recipe, num_labels):
    folder = _classifier(tmp_path / "clf", None)
    built = _build(tiny_recipe, folder, _csv(tmp_path / "d.csv", ["a", "b"] * 12), num_labels=num_labels)
    # Before, setting id2label after num_labels shrank the head back to the data's 2 classes.
    assert built.model.config.num_labels == num_labels and _head(built.model).shape[0] == num_labels
    assert built.model.config.id2label[4] == "LABEL_4"


def test_el2n_pruning_trains_its_proxy_on_a_resized_head(tmp_path, tiny_recipe):
    folder = _classifier(tmp_path / "clf", None)
    recipe = tiny_recipe(
        model={"name_or_path": str(folder), "task": "classification", "config_overrides": {}},
        data={"train": str(_csv(tmp_path / "d.csv", ["a", "b", "c"] * 8)), "max_length": 16},
        techniques=[{"name": "data_pruning", "score": "el2n", "proxy_steps": 2, "reuse_scores": False}],
    )
    built = build(Recipe.parse(recipe))  # the proxy is the checkpoint with a 3-row head, like the run's model
    assert len(built.train_dataset) == 12 and _head(built.model).shape[0] == 3


def test_a_width_override_of_pretrained_weights_is_named_not_re_initialized(tmp_path, tiny_recipe):
    from hf_efftrain.errors import RecipeError

    folder = _classifier(tmp_path / "clf", None)
    data = _csv(tmp_path / "d.csv", ["a", "b", "c"] * 8)  # resizes the head, so shapes may mismatch there only
    with pytest.raises(RecipeError, match=r"model.config_overrides: weights of .* would change shape \(bert\."):
        _build(tiny_recipe, folder, data, config_overrides={"intermediate_size": 48})


def test_lora_on_a_resized_head_trains_reloads_from_its_card_and_merges(tmp_path, tiny_recipe, train_keeping_built):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    from hf_efftrain.cli import main

    folder = _classifier(tmp_path / "clf", None)
    recipe = tiny_recipe(
        model={"name_or_path": str(folder), "task": "classification", "config_overrides": {}},
        data={"train": str(_csv(tmp_path / "d.csv", ["a", "b", "c"] * 8)), "max_length": 16},
        techniques=[{"name": "peft", "method": "lora", "r": 4, "target_modules": ["query", "value"]}],
    )
    _, built = train_keeping_built(recipe)
    out = Path(recipe["training"]["output_dir"])
    line = (
        f'AutoPeftModelForSequenceClassification.from_pretrained("{out}", num_labels=3, ignore_mismatched_sizes=True)'
    )
    assert line in (out / "README.md").read_text()
    batch = built.collator([built.train_dataset[i] for i in range(4)])
    batch.pop("labels")
    with torch.no_grad():
        want = built.model.eval()(**batch).logits
        reloaded = AutoPeftModelForSequenceClassification.from_pretrained(
            out, num_labels=3, ignore_mismatched_sizes=True
        ).eval()
        torch.testing.assert_close(reloaded(**batch).logits, want)
        assert main(["merge", str(out)]) == 0  # the base's 2-row head is replaced by the adapter's trained one
        merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-5, atol=1e-5)
