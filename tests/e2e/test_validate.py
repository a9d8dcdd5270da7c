"""`hf-efftrain validate` is a dry build (core/dry_run.py): the model on the meta device, no weights read, nothing
written, and one training example printed with the tokens that carry loss in [[ ]] (core/example.py). The cases
where validate and train must refuse alike are in test_hostile_input.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from hf_efftrain.builtins import get_tokenizer
from hf_efftrain.cli import main
from hf_efftrain.core.example import render_example

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("log_to_this_tests_stderr")]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def text(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).replace("\n", "\\n")


def validate(tmp_path, capsys, recipe: dict) -> tuple[int, list[str], str]:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


# ---- the printer, on hand-made rows ---------------------------------------------------------------------------
def test_prompt_without_loss_and_response_in_brackets(tok):
    prompt = tok("Question:\nsay hi", add_special_tokens=False)["input_ids"]
    response = tok(" hello there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    lines = render_example(tok, prompt + response, [-100] * len(prompt) + response)
    assert lines == [
        f"{len(prompt) + len(response)} tokens, {len(response)} with loss (in [[ ]])",
        f"  {text(tok, prompt)}[[{text(tok, response)}]]",
    ]
    assert "\n" not in lines[1]  # escaped: the row stays on one line


def test_masked_token_shows_input_and_label(tok):
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    k = len(ids) // 2
    inputs, labels = list(ids), [-100] * len(ids)
    inputs[k], labels[k] = tok.mask_token_id, ids[k]
    (_, line) = render_example(tok, inputs, labels)
    expected = f"{text(tok, ids[:k])}[[{tok.mask_token}→{text(tok, [ids[k]])}]]{text(tok, ids[k + 1 :])}"
    assert line == "  " + expected


def test_long_row_is_cut_around_the_first_trained_token(tok):
    ids = [tok.convert_tokens_to_ids(tok.tokenize(" word")[0])] * 200
    labels = [-100] * 100 + ids[100:]
    head, line = render_example(tok, ids, labels, window=60)
    assert head == "200 tokens, 100 with loss (in [[ ]]); tokens 80-139 shown"
    assert line == "  …" + text(tok, ids[80:100]) + "[[" + text(tok, ids[100:140]) + "]]…"


def test_encoder_decoder_target_and_class_label(tok):
    src = tok("translate me", add_special_tokens=False)["input_ids"]
    tgt = tok("done", add_special_tokens=False)["input_ids"]
    assert render_example(tok, src, tgt, aligned=False)[1:] == [
        f"  input:  {text(tok, src)}",
        f"  target: [[{text(tok, tgt)}]]",
    ]
    head, _ = render_example(tok, src, 2, label_names={0: "neg", 1: "neu", 2: "pos"})
    assert head == f"{len(src)} tokens, class 2 ('pos') for the whole row"


# ---- through the command ------------------------------------------------------------------------------------------
def test_validate_prints_the_sft_example_with_its_mask(tmp_path, capsys, tiny_recipe, tok):
    """The row printed is the first tokenized row, its [[ ]] exactly the labels != -100 (whatever the SFT
    rendering: a chat template or the ### Instruction one): the response is in it, the prompt is not."""
    import datasets

    from hf_efftrain.core.data import tokenize
    from hf_efftrain.core.recipe import Recipe

    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"say hi {i}", "response": "hello there"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(
        data={"train": str(path), "max_train_samples": None, "max_eval_samples": None},
        model={"task": "sft"},
        training={"per_device_train_batch_size": 2},
    )
    code, out, err = validate(tmp_path, capsys, recipe)
    assert code == 0, err
    assert f"{tmp_path / 'r.yaml'}: ok (0 techniques: none; sft, LlamaForCausalLM, 8 train examples)" in out
    (first,) = tokenize(datasets.Dataset.from_list(rows[:1]), "sft", tok, Recipe.parse(recipe).data)
    trained = [i for i, label in zip(first["input_ids"], first["labels"]) if label != -100]
    header = next(line for line in out if line.startswith("example, data.train row 0: "))
    assert header.endswith(f": {len(first['input_ids'])} tokens, {len(trained)} with loss (in [[ ]])")
    prompt, span = re.fullmatch(r"  (.*)\[\[(.*)\]\]", out[out.index(header) + 1]).groups()
    assert span == text(tok, trained) and span.startswith("hello there")
    assert "say hi 0" in prompt and "hello" not in prompt
    assert not Path(recipe["training"]["output_dir"]).exists()  # a dry build writes nothing


def test_validate_shows_the_masked_lm_collators_masks(tmp_path, capsys, tiny_recipe):
    recipe = tiny_recipe(model={"name_or_path": "builtin:tiny-bert", "config_overrides": {}})
    code, out, err = validate(tmp_path, capsys, recipe)
    assert code == 0, err
    header = next(line for line in out if line.startswith("example, data.train row 0: "))
    n_tokens, n_loss = map(int, re.search(r"(\d+) tokens, (\d+) with loss", header).groups())
    assert 0 < n_loss < n_tokens  # the collator's ~15% of the row, not the whole row
    assert "[[<mask>→" in out[out.index(header) + 1]


def test_validate_shows_a_reward_models_pair_and_where_it_reads_the_reward(tmp_path, capsys, tiny_recipe):
    recipe = tiny_recipe(data={"train": "builtin:pref-synthetic"}, techniques=[{"name": "reward_model"}])
    code, out, err = validate(tmp_path, capsys, recipe)
    assert code == 0, err
    assert any("reward, LlamaForSequenceClassification" in line for line in out)
    header = next(i for i, line in enumerate(out) if line.startswith("example, data.train row 0: chosen "))
    assert out[header + 2].startswith("rejected ")
    assert out[header + 4] == "the reward is read at each side's last token ('\\n', '\\n'), not a token loss"


def test_hooks_run_on_the_meta_model_without_reading_weights(tmp_path, tiny_recipe, monkeypatch):
    """A saved model folder: config only, every parameter on meta, from_pretrained never called; a technique's
    on_model sees that model (peft wraps it)."""
    import transformers

    from hf_efftrain.builtins import builtin_config
    from hf_efftrain.core.dry_run import dry_build
    from hf_efftrain.core.recipe import Recipe

    folder = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(builtin_config("tiny-llama", get_tokenizer())).save_pretrained(
        folder
    )
    get_tokenizer().save_pretrained(folder)

    def no_weights(*args, **kwargs):
        raise AssertionError("a dry build loads no weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    recipe = tiny_recipe(model={"name_or_path": str(folder), "config_overrides": {}}, techniques=[{"name": "peft"}])
    dry = dry_build(Recipe.parse(recipe))
    assert type(dry.model).__name__ == "PeftModelForCausalLM" and dry.unchecked == []
    assert all(p.is_meta for p in dry.model.parameters())
    assert dry.trainer.model is dry.model


def test_a_hook_that_needs_weights_is_listed_not_fatal(tmp_path, capsys, tiny_recipe, monkeypatch):
    from hf_efftrain.techniques.lion import LionTechnique

    def needs_weights(self, model):
        next(model.parameters()).to("cpu")  # what a hook reading weight values does: meta tensors have none
        return model

    monkeypatch.setattr(LionTechnique, "on_model", needs_weights)
    code, out, err = validate(tmp_path, capsys, tiny_recipe(techniques=[{"name": "lion"}]))
    assert code == 0, err
    (note,) = [line for line in out if line.startswith("not checked without weights: ")]
    assert note.startswith("not checked without weights: lion.on_model: NotImplementedError: Cannot copy out of meta")


def test_an_on_model_refusal_is_the_same_line_as_trains(tmp_path, capsys, tiny_recipe):
    """packing accepts model.task auto in its validate(); the model it then sees (an encoder-decoder) it refuses."""
    recipe = tiny_recipe(
        model={"name_or_path": "builtin:tiny-t5", "config_overrides": {}}, techniques=[{"name": "packing"}]
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    lines = []
    for command in ("validate", "train"):
        assert main([command, str(path)]) == 2
        lines.append([line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")])
    assert (
        lines[0]
        == lines[1]
        == ["error: model.name_or_path: packing needs a decoder-only causal LM, not an encoder-decoder"]
    )


def test_the_dry_build_builds_what_build_builds(tmp_path, tiny_recipe):
    """Less the weights, the dry build's pieces are build()'s: TrainingArguments, model class and shapes, collator,
    callbacks, optimizer, metrics. A step added to build() and not to dry_run.py fails here."""
    from hf_efftrain.core.build import build
    from hf_efftrain.core.dry_run import dry_build
    from hf_efftrain.core.recipe import Recipe

    techniques = [{"name": "lion"}, {"name": "layer_dropping"}, {"name": "divergence_guard", "on_diverge": "stop"}]
    recipe = Recipe.parse(tiny_recipe(techniques=techniques, training={"eval_strategy": "steps", "eval_steps": 2}))
    dry, built = dry_build(recipe), build(recipe)
    assert dry.trainer.args.to_dict() == built.trainer.args.to_dict()
    assert type(dry.model) is type(built.model)
    assert {n: p.shape for n, p in dry.model.named_parameters()} == {
        n: p.shape for n, p in built.model.named_parameters()
    }
    assert type(dry.collator) is type(built.collator)
    assert [type(c) for c in dry.trainer.callback_handler.callbacks] == [
        type(c) for c in built.trainer.callback_handler.callbacks
    ]
    assert dry.trainer.optimizer_cls_and_kwargs[0] is built.trainer.optimizer_cls_and_kwargs[0]
    assert type(dry.trainer.compute_metrics) is type(built.trainer.compute_metrics)
    assert dry.trainer.model_accepts_loss_kwargs == built.trainer.model_accepts_loss_kwargs
    assert (len(dry.train_dataset), len(dry.eval_dataset)) == (len(built.train_dataset), len(built.eval_dataset))
