"""core/merge.py and `hf-efftrain merge RUN_DIR`: the base is reloaded (never a copy of the trained model), the
merge equals the trained adapter model, the merged folder appears whole or not at all, and every way it cannot work
is one user error. Also model.revision, which the adapter records so that the base reloads at the same commit."""

from __future__ import annotations

import copy
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from hf_efftrain.cli import main
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.merge import merge_run
from hf_efftrain.core.recipe import Recipe
from hf_efftrain.errors import RecipeError
from hf_efftrain.runtime.checkpoint import OutputWriteError
from hf_efftrain.techniques.peft import merge_and_save

LORA = {"name": "peft", "method": "lora", "r": 4, "target_modules": "all-linear"}


def _base_folder(recipe: dict, folder: Path) -> Path:
    built = build(Recipe.parse(recipe))
    built.model.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, train_keeping_built):
    """One LoRA run (4 steps) on a local save_pretrained folder, for the whole module: (run_dir, base, model)."""
    tmp = tmp_path_factory.mktemp("merge")
    data = {"train": "builtin:stdlib-docs", "max_length": 64, "max_train_samples": 64, "max_eval_samples": 16}
    training = {"output_dir": str(tmp / "run"), "max_steps": 4, "per_device_train_batch_size": 8, "seed": 0,
                "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1}  # fmt: skip
    tiny = {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 2}}
    base = _base_folder({"model": tiny, "data": data, "training": training}, tmp / "base")
    model = {"name_or_path": str(base), "revision": "v1"}
    recipe = {"model": model, "data": data, "training": training, "techniques": [LORA]}
    model = train_keeping_built(recipe)[1].model.eval()
    return Path(recipe["training"]["output_dir"]), base, model


@pytest.fixture
def trained(trained_once, tmp_path):
    """A private copy of that run and its base (tests may delete or fail to write them); the same trained model."""
    run_once, base_once, model = trained_once
    base, run_dir = tmp_path / "base", tmp_path / "run"
    shutil.copytree(base_once, base)
    shutil.copytree(run_once, run_dir)
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    (run_dir / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": str(base)}))
    model.peft_config["default"].base_model_name_or_path = str(base)  # what merge_and_save reloads
    return run_dir, base, model


def _logits(model, seed: int = 0) -> torch.Tensor:
    x = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=x).logits


def test_merged_model_equals_the_trained_adapter_model(trained):
    run_dir, base, model = trained
    out = merge_run(run_dir, "float32")
    assert out == run_dir / "merged"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), _logits(model), rtol=1e-5, atol=1e-5)
    assert (_logits(AutoModelForCausalLM.from_pretrained(base)) - _logits(model)).abs().max() > 1e-3
    assert (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "merged into its base model" in card and "AutoModelForCausalLM" in card
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".merged")]  # no staging folder left


def test_merge_and_save_reloads_the_base_instead_of_copying_the_model(trained, tmp_path, monkeypatch):
    _, _, model = trained
    copied = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, memo=None: copied.append(type(x)) or real_deepcopy(x, memo))
    loaded = []
    real_from_pretrained = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, name, **kwargs):
        loaded.append((name, kwargs))
        return real_from_pretrained(cls, name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    folder = merge_and_save(model, tmp_path / "merged")
    assert not [t for t in copied if issubclass(t, torch.nn.Module)]
    base_name = model.peft_config["default"].base_model_name_or_path
    assert [(name, kw["revision"]) for name, kw in loaded] == [(base_name, "v1")]  # at the recorded revision
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the adapter model is untouched
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(folder)), _logits(model))


def _fail_after_writing(monkeypatch):
    def save(self, folder, *args, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save)


def test_a_failed_merge_leaves_no_merged_folder_and_keeps_an_earlier_one(trained, monkeypatch):
    run_dir, _, model = trained
    with monkeypatch.context() as mp:
        _fail_after_writing(mp)
        with pytest.raises(OutputWriteError, match="No space left on device"):
            merge_run(run_dir)
    assert not (run_dir / "merged").exists()
    merge_run(run_dir, "float32")
    good = (run_dir / "merged" / "model.safetensors").read_bytes()
    with monkeypatch.context() as mp:
        _fail_after_writing(mp)
        with pytest.raises(OutputWriteError):
            merge_run(run_dir)
    assert (run_dir / "merged" / "model.safetensors").read_bytes() == good
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".merged")]
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(run_dir / "merged")), _logits(model))


def test_a_quantized_base_run_merges_into_the_unquantized_original(
    trained, tiny_recipe, tmp_path, train_keeping_built
):
    from peft import PeftModel

    _, base, _ = trained
    recipe = tiny_recipe(
        model={"name_or_path": str(base), "config_overrides": {}},
        training={"max_steps": 2, "learning_rate": 1e-2, "output_dir": str(tmp_path / "int8")},
        techniques=[{"name": "quantized_base", "bits": 8}, LORA],  # int8: bnb CPU 4-bit fails on these tiny shapes
    )
    report, _ = train_keeping_built(recipe)
    assert report["model_config"]["quantization_config"]["load_in_8bit"]  # trained on an 8-bit base
    merged = AutoModelForCausalLM.from_pretrained(merge_run(tmp_path / "int8", "float32"))
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("proj"))
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "int8").eval()
    torch.testing.assert_close(_logits(merged), _logits(original))  # the adapter on the original weights


def test_revision_reaches_the_loaders_the_adapter_and_the_card(trained):
    run_dir, _, _ = trained
    assert json.loads((run_dir / "adapter_config.json").read_text())["revision"] == "v1"
    assert "at revision `v1`" in (run_dir / "README.md").read_text()
    with pytest.raises(RecipeError, match="model.revision: .*builtin"):
        Recipe.parse({"model": {"name_or_path": "builtin:tiny-llama", "revision": "main"},
                      "data": {"train": "builtin:stdlib-docs"}, "training": {"output_dir": "x"}})  # fmt: skip


def _cli_error(capsys, *argv) -> str:
    capsys.readouterr()  # only what this command prints
    assert main(["merge", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_merge_user_errors_are_one_line_exit_2(trained, tiny_recipe, tmp_path, capsys, train_keeping_built):
    run_dir, base, _ = trained
    assert "error: RUN_DIR: " in _cli_error(capsys, tmp_path) and "has no adapter_config.json" in _cli_error(
        capsys, base
    )
    builtin_run = tiny_recipe(training={"max_steps": 1, "output_dir": str(tmp_path / "b")}, techniques=[LORA])
    train_keeping_built(builtin_run)
    assert "records no base model" in _cli_error(capsys, tmp_path / "b")
    quantized = tmp_path / "quantized_base"
    shutil.copytree(base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bnb"}}))
    adapter = tmp_path / "adapter_on_quantized"
    shutil.copytree(run_dir, adapter, ignore=shutil.ignore_patterns("merged"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(quantized)}))
    assert "is a quantized checkpoint" in _cli_error(capsys, adapter)
    shutil.rmtree(base)
    assert "cannot load the adapter's base model" in _cli_error(capsys, run_dir)
    assert not (run_dir / "merged").exists()


def test_merge_and_save_needs_a_base_with_weights(tiny_recipe):
    recipe = Recipe.parse(tiny_recipe(techniques=[{**LORA, "merge_and_save": True}]))
    with pytest.raises(RecipeError, match=r"techniques\[0\].merge_and_save: .*builtin"):
        make_techniques(recipe)


def test_merge_cli_prints_the_folder(trained, capsys):
    run_dir, _, _ = trained
    assert main(["merge", str(run_dir), "--dtype", "bfloat16", "--out", str(run_dir / "bf16")]) == 0
    assert capsys.readouterr().out.strip() == f"merged model: {run_dir / 'bf16'}"
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "bf16")
    assert next(merged.parameters()).dtype == torch.bfloat16


def test_merge_and_save_in_a_run_gets_a_model_card(trained, tiny_recipe, tmp_path, train_keeping_built):
    _, base, _ = trained
    recipe = tiny_recipe(
        model={"name_or_path": str(base), "config_overrides": {}},
        training={"max_steps": 2, "output_dir": str(tmp_path / "merging")},
        techniques=[{**LORA, "merge_and_save": True}],
    )
    report, built = train_keeping_built(recipe)
    model = built.model.eval()
    merged = tmp_path / "merging" / "merged"
    assert report["techniques"][0]["report"]["merged_model"] == str(merged)
    card = (merged / "README.md").read_text()
    assert "merged into its base model" in card and f"| steps | {report['steps']} |" in card
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged)), _logits(model))
