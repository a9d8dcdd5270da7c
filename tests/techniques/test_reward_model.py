"""Reward modelling (Ouyang et al. 2022, eq. 1; Llama 2's margin; Eisenstein et al.'s centring): the loss by hand,
the reward read where a standalone HF model reads it, a pretrained causal LM turned into a reward model, LoRA with
its head trained and merged, a recipe that learns to rank held-out pairs, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_efftrain import Recipe, train
from hf_efftrain.builtins.data import load_builtin_dataset
from hf_efftrain.core.build import build
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.reward_model import pair_rewards, reward_loss


def test_reward_loss_by_hand():
    r = torch.tensor([[1.0, -0.5], [0.2, 0.7]])  # (chosen, rejected) per pair
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    plain = (-math.log(sig(1.5)) - math.log(sig(-0.5))) / 2
    assert reward_loss(r).item() == pytest.approx(plain)
    margin = torch.tensor([1.0, 0.0])  # Llama 2 eq. 2: -log sigmoid(r_w - r_l - m)
    assert reward_loss(r, margin).item() == pytest.approx((-math.log(sig(0.5)) - math.log(sig(-0.5))) / 2)
    centred = plain + 0.01 * ((1.0 - 0.5) ** 2 + (0.2 + 0.7) ** 2) / 2  # + eta (r_w + r_l)^2
    assert reward_loss(r, None, 0.01).item() == pytest.approx(centred)
    assert reward_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log(2))


def _recipe(tiny_recipe, tmp_path, techniques=None, model=None, **training):
    data = {"train": "builtin:pref-synthetic", "max_train_samples": 64, "max_eval_samples": 16}
    return tiny_recipe(
        model=model or {},
        data=data,
        training={"max_steps": 2, "per_device_train_batch_size": 4, **training},
        techniques=techniques if techniques is not None else [{"name": "reward_model"}],
    )


def test_reward_is_read_at_each_rows_last_token_as_a_standalone_model_reads_it(tiny_recipe, tmp_path):
    built = build(Recipe.parse(_recipe(tiny_recipe, tmp_path)))
    assert built.task == "reward" and type(built.model).__name__ == "LlamaForSequenceClassification"
    assert built.model.config.num_labels == 1
    model, rows = built.model.eval(), [built.train_dataset[i] for i in range(3)]
    with torch.no_grad():
        rewards = pair_rewards(model, built.collator(rows))  # padded together: 6 rows of different lengths
        for k, row in enumerate(rows):
            for side, prefix in enumerate(("", "rejected_")):
                alone = model(input_ids=torch.tensor([row[prefix + "input_ids"]])).logits[0, 0]
                assert rewards[k, side].item() == pytest.approx(alone.item(), abs=1e-5)
    assert rewards[:, 0].tolist() != rewards[:, 1].tolist()


def test_a_pretrained_causal_lm_becomes_a_reward_model_with_its_body_kept(tiny_recipe, tmp_path):
    source = build(Recipe.parse(tiny_recipe()))
    folder = tmp_path / "lm"
    source.model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    built = build(Recipe.parse(_recipe(tiny_recipe, tmp_path, model={"name_or_path": str(folder),
                                                                     "config_overrides": {}})))  # fmt: skip
    body, lm = built.model.model.state_dict(), source.model.model.state_dict()
    assert body.keys() == lm.keys() and all(torch.equal(body[k], lm[k]) for k in lm)
    assert built.model.score.weight.shape == (1, source.model.config.hidden_size)
    assert "classifier_head" not in built.data_stats  # a causal LM has no head to keep or resize


def test_a_classifier_checkpoint_is_a_reward_model_and_its_head_is_resized(tiny_recipe, tmp_path):
    cls = build(Recipe.parse(tiny_recipe(data={"train": "builtin:cls-synthetic"})))
    assert cls.model.config.num_labels > 1
    folder = tmp_path / "classifier"
    cls.model.save_pretrained(folder)
    cls.tokenizer.save_pretrained(folder)
    model = {"name_or_path": str(folder), "config_overrides": {}}
    with pytest.raises(RecipeError, match=r"^techniques: preference data .* add \{name: reward_model\}"):
        build(Recipe.parse(_recipe(tiny_recipe, tmp_path, techniques=[], model=model)))  # task inferred: reward
    built = build(Recipe.parse(_recipe(tiny_recipe, tmp_path, model=model)))
    assert built.task == "reward" and built.data_stats["classifier_head"] == "re-initialized"
    assert built.model.score.weight.shape[0] == 1


def test_recipe_learns_to_rank_held_out_pairs_and_saves_a_standard_reward_model(tiny_recipe, tmp_path):
    recipe = _recipe(tiny_recipe, tmp_path, max_steps=60, per_device_train_batch_size=8, learning_rate=1e-3,
                     logging_steps=20, eval_strategy="steps", eval_steps=60)  # fmt: skip
    recipe["data"].update(max_train_samples=512, max_eval_samples=64)
    report = train(Recipe.parse(recipe))
    losses = [loss for _, loss in report["loss_history"]]
    assert losses[-1] < losses[0] - 0.05
    assert report["eval_accuracy"] > 0.6 and report["eval_margin"] > 0
    assert "eval_perplexity" not in report
    out = tmp_path / "run"
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "reward"} and model.config.pad_token_id == tok.pad_token_id
    # the saved model ranks pairs as the run's evaluation did: its accuracy on the same held-out pairs
    built = build(Recipe.parse({**recipe, "model": {**recipe["model"], "name_or_path": str(out),
                                                    "config_overrides": {}}}))  # fmt: skip
    rows = [built.eval_dataset[i] for i in range(len(built.eval_dataset))]
    with torch.no_grad():
        rewards = pair_rewards(model, built.collator(rows))
    assert (rewards[:, 0] > rewards[:, 1]).float().mean().item() == pytest.approx(report["eval_accuracy"], abs=1e-4)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card


def test_lora_trains_the_head_and_merges_into_the_same_scores(tiny_recipe, tmp_path):
    source = build(Recipe.parse(tiny_recipe()))
    folder = tmp_path / "lm"
    source.model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    lora = {"name": "peft", "method": "lora", "r": 4, "merge_and_save": True}
    model = {"name_or_path": str(folder), "config_overrides": {}}
    built = build(Recipe.parse(_recipe(tiny_recipe, tmp_path, [lora, {"name": "reward_model"}], model, max_steps=3)))
    heads = {n: p.detach().clone() for n, p in built.model.named_parameters() if "score" in n and p.requires_grad}
    assert heads  # the fresh head learns (PEFT's modules_to_save)
    built.trainer.train()
    assert built.model.peft_config["default"].task_type == "SEQ_CLS"
    trained = dict(built.model.named_parameters())
    assert all(not torch.equal(trained[n], h) for n, h in heads.items())
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "merged").eval()
    batch = built.collator([built.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(pair_rewards(merged, batch), pair_rewards(built.model.eval(), batch))


def _with_margins(tmp_path, margins) -> str:
    """builtin:pref-synthetic's first pairs with a ``margin`` column (Llama 2: larger for pairs rated apart)."""
    rows = load_builtin_dataset("pref-synthetic")["train"].select(range(len(margins))).to_list()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**r, "margin": m}) + "\n" for r, m in zip(rows, margins)))
    return str(path)


def test_a_margin_column_reaches_the_loss(tiny_recipe, tmp_path):
    margins = [float(i % 4) for i in range(32)]
    recipe = _recipe(tiny_recipe, tmp_path)
    recipe["data"].update(train=_with_margins(tmp_path, margins), eval_fraction=0.25)
    built = build(Recipe.parse(recipe))
    assert sorted(list(built.train_dataset["margin"]) + list(built.eval_dataset["margin"])) == sorted(margins)
    rows = [built.train_dataset[i] for i in range(4)]
    batch = built.collator(rows)
    assert batch["margin"].tolist() == [r["margin"] for r in rows]
    technique = next(t for t in built.techniques if t.name == "reward_model")
    with torch.no_grad():
        got = technique.loss(built.model, batch, None)
        want = reward_loss(pair_rewards(built.model, batch), batch["margin"])
    assert got.item() == pytest.approx(want.item()) and want.item() != pytest.approx(
        reward_loss(pair_rewards(built.model, batch)).item()
    )
    recipe["data"]["train"] = _with_margins(tmp_path, margins[:-1] + ["high"])
    with pytest.raises(RecipeError, match=r"^data.margin_field: row \d+: margin is 'high', not a number"):
        build(Recipe.parse(recipe))
    recipe["data"].update(train="builtin:pref-synthetic", margin_field="score_gap")
    with pytest.raises(RecipeError, match=r"^data.margin_field: column 'score_gap' not in builtin:pref-synthetic"):
        build(Recipe.parse(recipe))
    recipe["techniques"] = [{"name": "dpo"}]
    with pytest.raises(RecipeError, match=r"^data.margin_field: applies to model.task reward .* not preference"):
        build(Recipe.parse(recipe))


def test_refusals(tiny_recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"^model.task: reward_model trains a reward model .* not sft"):
        build(Recipe.parse(_recipe(tiny_recipe, tmp_path, model={"task": "sft"})))
    with pytest.raises(RecipeError, match=r"^techniques: preference data .* add \{name: reward_model\}"):
        build(Recipe.parse(_recipe(tiny_recipe, tmp_path, techniques=[], model={"task": "reward"})))
    with pytest.raises(RecipeError, match=r"^model.task: dpo trains on preference pairs .* not reward"):
        build(Recipe.parse(_recipe(tiny_recipe, tmp_path, techniques=[{"name": "dpo"}], model={"task": "reward"})))
    with pytest.raises(RecipeError, match=r"reward_model cannot be combined with dpo"):
        build(Recipe.parse(_recipe(tiny_recipe, tmp_path, techniques=[{"name": "reward_model"}, {"name": "dpo"}])))
    with pytest.raises(RecipeError, match=r"reward_model cannot be combined with packing"):
        build(Recipe.parse(_recipe(tiny_recipe, tmp_path, techniques=[{"name": "reward_model"}, {"name": "packing"}])))
    with pytest.raises(RecipeError, match=r"^data.chosen_field: column 'chosen' not in builtin:stdlib-docs"):
        build(Recipe.parse(tiny_recipe(model={"task": "reward"}, techniques=[{"name": "reward_model"}])))
    with pytest.raises(RecipeError, match=r"^techniques\[0\].center_rewards_coefficient"):
        Recipe.parse(_recipe(tiny_recipe, tmp_path, techniques=[{"name": "reward_model",
                                                                 "center_rewards_coefficient": -1}]))  # fmt: skip
