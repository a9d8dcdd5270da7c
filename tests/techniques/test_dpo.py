"""DPO (Rafailov et al. 2023, arXiv 2305.18290): the loss and log-probabilities by hand, preference pairs tokenized
as two SFT rows (text, turns, the implicit prompt), the reference precomputed from the model as loaded (adapters
off), a recipe that starts at log 2 and learns to prefer the chosen answers, and the refusals."""

from __future__ import annotations

import math

import datasets
import pydantic
import pytest
import torch

from hf_efftrain import Recipe, train
from hf_efftrain.core.build import build
from hf_efftrain.core.data.preference import REJECTED, split_shared_turns
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.dpo import (
    DpoConfig,
    DpoTechnique,
    dpo_loss,
    pair_logps,
    reference_logps,
    sequence_logps,
)


def test_sequence_logps_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 5, -100, -100]])
    total, count = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    # position t predicts labels[t + 1]
    row0 = logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 1]
    row1 = logp[1, 0, 2] + logp[1, 1, 5]
    torch.testing.assert_close(total, torch.stack([row0, row1]))
    assert count.tolist() == [3, 2]


def test_dpo_loss_by_hand():
    policy = torch.tensor([[-10.0, -12.0], [-5.0, -4.0]])
    reference = torch.tensor([[-11.0, -11.0], [-5.0, -5.0]])
    beta = 0.5
    # h = (pi_w - ref_w) - (pi_l - ref_l): row 0: 1 - (-1) = 2; row 1: 0 - 1 = -1
    loss, rewards = dpo_loss(policy, reference, beta)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(loss, torch.tensor([-math.log(sig(1.0)), -math.log(sig(-0.5))]))
    torch.testing.assert_close(rewards, torch.tensor([[0.5, -0.5], [0.0, 0.5]]))
    smoothed, _ = dpo_loss(policy, reference, beta, label_smoothing=0.2)
    expected = [
        -0.8 * math.log(sig(1.0)) - 0.2 * math.log(sig(-1.0)),
        -0.8 * math.log(sig(-0.5)) - 0.2 * math.log(sig(0.5)),
    ]
    torch.testing.assert_close(smoothed, torch.tensor(expected))
    ipo, _ = dpo_loss(policy, reference, beta, "ipo")  # (h - 1/(2 beta))^2 = (h - 1)^2
    torch.testing.assert_close(ipo, torch.tensor([1.0, 4.0]))
    # equal policy and reference: h = 0, the loss is log 2 whatever the log-probabilities
    torch.testing.assert_close(dpo_loss(policy, policy, 3.0)[0], torch.full((2,), math.log(2)))


def test_reference_free_losses_by_hand():
    # mean log-probs per token: row 0 prefers the chosen, row 1 the rejected
    m = torch.tensor([[-0.5, -1.5], [-2.0, -1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # SimPO eq. 6: -log sigmoid(beta (m_w - m_l) - gamma); beta 2, gamma 0.5
    simpo, rewards = dpo_loss(m, None, 2.0, "simpo", gamma=0.5)
    torch.testing.assert_close(simpo, torch.tensor([-math.log(sig(2.0 - 0.5)), -math.log(sig(-2.0 - 0.5))]))
    torch.testing.assert_close(rewards, 2.0 * m)  # beta m: no reference
    smoothed, _ = dpo_loss(m, None, 2.0, "simpo", label_smoothing=0.1, gamma=0.5)
    z = 2.0 - 0.5
    assert smoothed[0].item() == pytest.approx(-0.9 * math.log(sig(z)) - 0.1 * math.log(sig(-z)))
    # ORPO eqs. 4-7: odds = P / (1 - P) with P = exp(m); loss = -lambda log sigmoid(log(odds_w / odds_l))
    orpo, rewards = dpo_loss(m, None, 0.1, "orpo")
    odds = lambda x: math.exp(x) / (1 - math.exp(x))  # noqa: E731
    expected = [-0.1 * math.log(sig(math.log(odds(w) / odds(r)))) for w, r in m.tolist()]
    torch.testing.assert_close(orpo, torch.tensor(expected))
    torch.testing.assert_close(rewards, 0.1 * m)
    assert torch.isfinite(dpo_loss(torch.zeros(1, 2), None, 0.1, "orpo")[0]).all()  # P = 1: odds clamped


def test_orpo_adds_the_chosen_nll_and_skips_the_reference(tiny_recipe, tmp_path):
    recipe = _pref_recipe(tiny_recipe, tmp_path, techniques=[{"name": "dpo", "loss_type": "orpo"}])
    built = build(Recipe.parse(recipe))
    assert "ref_logps" not in built.trainer.train_dataset.column_names  # reference-free: no reference pass
    technique = next(t for t in built.techniques if t.name == "dpo")
    assert technique.beta == 0.1 and technique.report()["reference"].startswith("none")
    batch = built.collator([built.trainer.train_dataset[i] for i in range(4)])
    model = built.model.train()
    loss = technique.loss(model, batch, None)
    with torch.no_grad():  # the SFT term: each chosen response's own LM loss (a token mean), averaged over pairs
        keys = ("input_ids", "attention_mask", "labels")
        nll = torch.stack([model(**{k: batch[k][i : i + 1] for k in keys}).loss for i in range(4)]).mean()
        mean, _ = pair_logps(model, batch, mean=True)
        odds_term = dpo_loss(mean, None, 0.1, "orpo")[0].mean()
    torch.testing.assert_close(loss.detach(), nll + odds_term, rtol=1e-5, atol=1e-6)
    logged = technique.metrics("train")
    assert logged["nll_loss"] == pytest.approx(float(nll), rel=1e-3)
    assert logged["log_odds_ratio"] == pytest.approx(float(-odds_term / 0.1), rel=1e-3)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_recipes_learn_to_prefer_chosen(tiny_recipe, tmp_path, loss_type):
    report, losses = _learning_run(tiny_recipe, tmp_path, {"name": "dpo", "loss_type": loss_type})
    assert losses[-1] < losses[0]
    assert report["eval_rewards/margins"] > 0 and report["eval_rewards/accuracies"] > 0.5
    facts = next(t["report"] for t in report["techniques"] if t["name"] == "dpo")
    assert facts["reference_pass_seconds"] is None and facts["beta"] == (2.0 if loss_type == "simpo" else 0.1)


def test_implicit_prompt_is_the_shared_turns():
    user = {"role": "user", "content": "Add 2 and 3."}
    good, bad = {"role": "assistant", "content": "5"}, {"role": "assistant", "content": "6"}
    prompt, chosen, rejected = split_shared_turns([user, good], [user, bad])
    assert (prompt, chosen, rejected) == ([user], [good], [bad])
    again = {"role": "user", "content": "Once more."}  # a shared earlier exchange is prompt (no loss), as in TRL
    prompt, chosen, rejected = split_shared_turns([user, good, again, good], [user, good, again, bad])
    assert (prompt, chosen, rejected) == ([user, good, again], [good], [bad])


def test_implicit_text_prompt_is_the_shared_words():
    hh = ("\n\nHuman: Add 2 and 3.\n\nAssistant: It is 5.", "\n\nHuman: Add 2 and 3.\n\nAssistant: It is 7.")
    assert split_shared_turns(*hh) == ("\n\nHuman: Add 2 and 3.\n\nAssistant: It is", "5.", "7.")  # no split word
    assert split_shared_turns("a b", "a b c") == ("a", "b", "b c")  # a response never empty by the cut
    assert split_shared_turns("yes", "no") == ("", "yes", "no")  # nothing shared: no prompt, the pair is dropped


def _pref_recipe(tiny_recipe, tmp_path, rows=None, techniques=None, model=None, **data):
    if rows is not None:
        path = tmp_path / "pairs.jsonl"
        datasets.Dataset.from_list(rows).to_json(path)
        data = {"train": str(path), **data}
    return tiny_recipe(
        model=model or {},
        data={"train": "builtin:pref-synthetic", "max_train_samples": 64, "max_eval_samples": 16, **data},
        training={"max_steps": 2, "per_device_train_batch_size": 4},
        techniques=techniques if techniques is not None else [{"name": "dpo"}],
    )


TURNS = [
    {
        "chosen": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
        "rejected": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "7"}],
    },
    {
        "chosen": [{"role": "user", "content": "Sort: 3 1"}, {"role": "assistant", "content": "1 3"}],
        "rejected": [{"role": "user", "content": "Sort: 3 1"}, {"role": "assistant", "content": "3 1"}],
    },
] * 4


@pytest.mark.parametrize("kind", ["text", "implicit turns"])
def test_pairs_tokenize_as_two_sft_rows_and_collate_chosen_first(tiny_recipe, tmp_path, kind):
    rows = None if kind == "text" else TURNS
    built = build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, rows)))
    assert built.task == "preference"
    tok, row = built.tokenizer, built.train_dataset[0]
    good = tok.decode([t for t in row["labels"] if t != -100])
    bad = tok.decode([t for t in row[REJECTED + "labels"] if t != -100])
    n = next(i for i, t in enumerate(row["labels"]) if t != -100)
    assert row["input_ids"][:n] == row[REJECTED + "input_ids"][:n]  # the same prompt, unlabelled
    if kind == "text":
        assert good != bad and good.strip() and bad.strip()
    else:
        assert "5" in good and "7" in bad and "Add" not in good  # only the answer (and its end of turn) is learnt
    features = [built.trainer.train_dataset[i] for i in range(3)]
    batch = built.collator(features)
    assert batch["input_ids"].shape[0] == 6 and "ref_logps" in batch  # added by the reference pass
    for k, f in enumerate(features):
        assert batch["labels"][k][: len(f["labels"])].tolist() == f["labels"]
        assert batch["labels"][3 + k][: len(f[REJECTED + "labels"])].tolist() == f[REJECTED + "labels"]


def _first_pair(tiny_recipe, tmp_path, rows) -> tuple[list, list]:
    (tmp_path / "pairs.jsonl").unlink(missing_ok=True)
    ds = build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, rows))).train_dataset
    return ds[0]["input_ids"], ds[0][REJECTED + "input_ids"]


def test_the_layouts_of_hh_rlhf_and_ultrafeedback_binarized(tiny_recipe, tmp_path):
    user = TURNS[0]["chosen"][:1]
    implicit = _first_pair(tiny_recipe, tmp_path, TURNS)
    # HuggingFaceH4/ultrafeedback_binarized: a text prompt that the turns repeat; the turns' shared prompt wins
    h4 = [{"prompt": user[0]["content"], **row} for row in TURNS]
    assert _first_pair(tiny_recipe, tmp_path, h4) == implicit
    # a text prompt and assistant-only turns: the prompt is the user's turn
    answers = [{"prompt": user[0]["content"], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]} for r in TURNS]
    assert _first_pair(tiny_recipe, tmp_path, answers) == implicit
    # Anthropic/hh-rlhf: text with the prompt inside; the shared words are the prompt, as a prompt column would be
    say = "\n\nHuman: Add 2 and 3.\n\nAssistant: It is"
    hh = _first_pair(tiny_recipe, tmp_path, [{"chosen": say + " 5.", "rejected": say + " 7."}] * 8)
    assert hh == _first_pair(tiny_recipe, tmp_path, [{"prompt": say, "chosen": "5.", "rejected": "7."}] * 8)
    assert hh != implicit  # each file was read afresh (no stale cache making every comparison equal)


def test_reference_is_the_model_as_loaded_with_adapters_off(tiny_recipe, tmp_path, tiny):
    from peft import LoraConfig, get_peft_model

    built = build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path)))
    ds = built.trainer.train_dataset
    stored = torch.tensor(ds["ref_logps"][:4])
    again = torch.tensor(
        reference_logps(built.model, ds.remove_columns("ref_logps").select(range(4)), built.collator, 2)
    )
    torch.testing.assert_close(stored, again)  # batch size does not change it
    model = tiny.model()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows = [{"input_ids": torch.arange(3, 11), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor([-100] * 4 + list(range(7, 11)))}]  # fmt: skip
    pairs = datasets.Dataset.from_list(
        [{k: v.tolist() for k, v in rows[0].items()} | {REJECTED + k: v.tolist() for k, v in rows[0].items()}]
    )
    collator = built.collator
    with_adapter = reference_logps(lora, pairs, collator, 1)
    with lora.disable_adapter():
        base = reference_logps(lora, pairs, collator, 1)
    assert with_adapter == base  # the pass itself turns the (non-zero) adapter off
    with torch.no_grad():  # the adapter is not zero: scoring with it on gives other numbers
        on = pair_logps(lora.eval(), {k: v for k, v in collator([pairs[0]]).items()}, mean=False)[0].tolist()
    assert on != base


def _learning_run(tiny_recipe, tmp_path, technique: dict) -> tuple[dict, list[float]]:
    """60 steps of 8 pairs with a held-out evaluation at the end: (the run report, the logged losses)."""
    recipe = _pref_recipe(tiny_recipe, tmp_path, max_train_samples=512, max_eval_samples=64, techniques=[technique])
    recipe["training"].update(
        max_steps=60, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=20, eval_strategy="steps",
        eval_steps=60,
    )  # fmt: skip
    report = train(Recipe.parse(recipe))
    return report, [loss for _, loss in report["loss_history"]]


def test_recipe_starts_at_log2_and_learns_to_prefer_chosen(tiny_recipe, tmp_path):
    report, losses = _learning_run(tiny_recipe, tmp_path, {"name": "dpo", "beta": 0.5})
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # dropout off: the policy starts as the reference
    assert losses[-1] < losses[0] - 0.02
    assert report["eval_rewards/margins"] > 0 and report["eval_rewards/accuracies"] > 0.5
    assert "eval_perplexity" not in report  # a DPO loss is not a token loss
    facts = next(t["report"] for t in report["techniques"] if t["name"] == "dpo")
    assert facts["reference_pass_seconds"] > 0


def test_dpo_with_lora_trains_and_gradient_accumulation_averages(tiny_recipe, tmp_path):
    recipe = _pref_recipe(
        tiny_recipe, tmp_path, techniques=[{"name": "peft", "method": "lora", "r": 4}, {"name": "dpo"}]
    )
    recipe["training"].update(gradient_accumulation_steps=2, max_steps=2)
    built = build(Recipe.parse(recipe))
    assert built.trainer.loss_is_scaled_for_ga is False  # a per-micro-batch mean: the Trainer divides it
    built.trainer.train()
    assert all(math.isfinite(e["loss"]) for e in built.trainer.state.log_history if "loss" in e)


def test_refusals(tiny_recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"^techniques: preference data .* add \{name: dpo\}"):
        build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, techniques=[])))
    with pytest.raises(RecipeError, match=r"^model.task: dpo trains on preference pairs"):
        build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, model={"task": "sft"})))
    with pytest.raises(RecipeError, match=r"^model.task: dpo is the objective of model.task preference .* causal_lm"):
        build(Recipe.parse(tiny_recipe(techniques=[{"name": "dpo"}])))  # text data, task auto
    with pytest.raises(RecipeError, match=r"dpo cannot be combined with packing"):
        build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, techniques=[{"name": "dpo"}, {"name": "packing"}])))
    with pytest.raises(RecipeError, match=r"^techniques\[0\].label_smoothing: applies to loss_type sigmoid or simpo"):
        ipo = [{"name": "dpo", "loss_type": "ipo", "label_smoothing": 0.1}]
        build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, techniques=ipo)))
    with pytest.raises(RecipeError, match=r"^data.chosen_field: chosen and rejected must both be text or both be"):
        rows = [{"prompt": "Add 2 and 3.", "chosen": "5", "rejected": TURNS[0]["rejected"]}] * 8
        build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, rows)))
    with pytest.raises(RecipeError, match=r"^data.chosen_field: .*a prompt of turns needs turns"):
        rows = [{"prompt": TURNS[0]["chosen"][:1], "chosen": "5", "rejected": "7"}] * 8
        build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, rows)))
    with pytest.raises(RecipeError, match=r"^techniques\[0\].simpo_gamma: applies to loss_type simpo, not sigmoid"):
        build(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path, techniques=[{"name": "dpo", "simpo_gamma": 1.0}])))
    zero3 = Env(distributed_type="DEEPSPEED", deepspeed_config={"zero_optimization": {"stage": 3}})
    with pytest.raises(RecipeError, match="ZeRO-3 and FSDP.*reference-free loss_type"):
        DpoTechnique().validate(Recipe.parse(_pref_recipe(tiny_recipe, tmp_path)), zero3)
    for loss_type in ("simpo", "orpo"):  # no reference pass: nothing to refuse
        DpoTechnique(DpoConfig(name="dpo", loss_type=loss_type)).validate(
            Recipe.parse(_pref_recipe(tiny_recipe, tmp_path)), zero3
        )
    for bad in ({"beta": 0}, {"label_smoothing": 0.5}, {"loss_type": "hinge"}, {"reference_batch_size": 0}):
        with pytest.raises(pydantic.ValidationError):
            DpoConfig(name="dpo", **bad)
