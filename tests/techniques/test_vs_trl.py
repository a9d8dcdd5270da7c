"""hf_efftrain's pair objectives against TRL (the field's reference implementation). ``dpo``: ``DPOTrainer`` for
sigmoid and ipo, ``experimental.cpo.CPOTrainer`` for simpo, ``experimental.orpo.ORPOTrainer`` for orpo;
``reward_model``: ``RewardTrainer``. The same model, the same tokenized pairs, the same optimizer and data order: the
per-step losses and logged numbers must agree. TRL tokenizes its own way (BOS/EOS details), so it is handed our
tokens and its own tokenization is skipped (RewardTrainer takes ``chosen_ids`` / ``rejected_ids`` as processed)."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import trl  # the test extra pins it

from hf_efftrain import Recipe
from hf_efftrain.builtins.data import load_builtin_dataset
from hf_efftrain.core.build import build
from hf_efftrain.core.data.preference import REJECTED

STEPS = 6
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
# TRL's configs default to bf16 autocast (even on a CPU): both sides run in our precision (_same_args). The numbers
# then agree to fp32 round-off; what is left is our logs' rounding to 4 decimals (absolute 5e-5).
TOLERANCE = {"loss": {"rel": 1e-5}, "logps": {"abs": 1e-4}, "rewards": {"abs": 1e-4}, "nll_loss": {"rel": 1e-5},
             "log_odds_ratio": {"abs": 1e-4}, "margin": {"abs": 1e-4}, "mean_reward": {"abs": 1e-4}}  # fmt: skip


def _as_trl_pairs(dataset) -> datasets.Dataset:
    """Our tokenized pairs as TRL's: the unlabelled prefix is the prompt, the labelled rest the completion."""
    rows = []
    for row in dataset:
        sides = {}
        for side, prefix in (("chosen", ""), ("rejected", REJECTED)):
            ids, labels = row[prefix + "input_ids"], row[prefix + "labels"]
            n = next(i for i, t in enumerate(labels) if t != -100)
            assert labels[n:] == ids[n:]  # the completion runs to the end: TRL's completion mask is the same
            sides[side] = (ids[:n], ids[n:])
        assert sides["chosen"][0] == sides["rejected"][0]
        rows.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                     "rejected_ids": sides["rejected"][1]})  # fmt: skip
    return datasets.Dataset.from_list(rows)


def _ours(tiny_recipe, technique: dict):
    """(built, the starting weights, the per-step logs) of a 6-step run of ``technique`` on 48 pairs."""
    recipe = tiny_recipe(
        data={"train": "builtin:pref-synthetic", "max_train_samples": 48, "max_eval_samples": 8},
        training={"max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "weight_decay": 0.01},
        techniques=[{"name": "dpo", **technique}],
    )
    built = build(Recipe.parse(recipe))
    start = copy.deepcopy(built.model)
    tokenized = built.trainer.train_dataset.remove_columns(
        [c for c in ("ref_logps",) if c in built.trainer.train_dataset.column_names]
    )
    built.trainer.train()
    return built, start, tokenized, [e for e in built.trainer.state.log_history if "loss" in e]


def _same_args(built, tmp_path) -> dict:
    """The TrainingArguments of our run that decide the updates and the data order, for TRL's config."""
    a = built.args
    fields = ("learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "optim",
              "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "data_seed", "bf16", "fp16",
              "per_device_train_batch_size")  # fmt: skip
    return {k: getattr(a, k) for k in fields} | dict(
        output_dir=str(tmp_path / "trl"), max_steps=STEPS, report_to=[], logging_steps=1, use_cpu=True,
        dataloader_pin_memory=False, save_strategy="no",
    )  # fmt: skip


def _agree(ours: list[dict], theirs: list[dict], keys) -> None:
    assert len(ours) == len(theirs) and len(ours) in (1, STEPS)
    for key in keys:
        got, want = [e[key] for e in ours], [e[key] for e in theirs]
        assert got == pytest.approx(want, **TOLERANCE[key.split("/")[0]]), key
    assert [e["rewards/accuracies"] for e in ours] == [e["rewards/accuracies"] for e in theirs]
    if len(ours) > 1:  # training moved: not a trivial agreement
        assert ours[-1]["loss"] != pytest.approx(ours[0]["loss"], abs=1e-3)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_matches_trl_step_by_step(tiny_recipe, tmp_path, monkeypatch, loss_type):
    built, start, tokenized, ours = _ours(tiny_recipe, {"beta": 0.5, "loss_type": loss_type})
    config = trl.DPOConfig(beta=0.5, loss_type=[loss_type], max_length=None, **_same_args(built, tmp_path))
    monkeypatch.setattr(trl.DPOTrainer, "_prepare_dataset", lambda self, dataset, *args: dataset)
    trainer = trl.DPOTrainer(
        model=start, ref_model=copy.deepcopy(start), args=config, train_dataset=_as_trl_pairs(tokenized),
        processing_class=built.tokenizer,
    )  # fmt: skip
    trainer.train()
    _agree(ours, [e for e in trainer.state.log_history if "loss" in e], KEYS)


def _as_trl_rows(dataset) -> datasets.Dataset:
    """Our tokenized pairs in the column names of TRL's CPO / ORPO trainers (labels -100 on the prompt, as ours)."""
    rows = []
    for row in dataset:
        n = next(i for i, t in enumerate(row["labels"]) if t != -100)
        out = {"prompt": "", "chosen": "", "rejected": "", "prompt_input_ids": row["input_ids"][:n],
               "prompt_attention_mask": [1] * n}  # fmt: skip
        for side, prefix in (("chosen", ""), ("rejected", REJECTED)):
            out |= {f"{side}_input_ids": row[prefix + "input_ids"], f"{side}_labels": row[prefix + "labels"],
                    f"{side}_attention_mask": row[prefix + "attention_mask"]}  # fmt: skip
        rows.append(out)
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_match_trl_step_by_step(tiny_recipe, tmp_path, monkeypatch, loss_type):
    built, start, tokenized, ours = _ours(tiny_recipe, {"loss_type": loss_type})
    if loss_type == "simpo":  # TRL's SimPO is CPO with loss_type simpo and no NLL term (cpo_alpha 0)
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        extra, keys = dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0), KEYS
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer

        # TRL's ORPO takes its NLL term over prompt and response, the paper (and ours) over the response: the
        # updates differ, so only the first step's odds-ratio numbers compare.
        extra, keys = dict(beta=0.1), ("rewards/chosen", "rewards/rejected", "logps/chosen", "log_odds_ratio")
    config = Config(max_length=None, **extra, **_same_args(built, tmp_path))
    monkeypatch.setattr(Trainer, "tokenize_row", lambda self, feature, model=None: feature)
    trainer = Trainer(
        model=start, args=config, train_dataset=_as_trl_rows(tokenized), processing_class=built.tokenizer
    )
    trainer.train()
    theirs = [e for e in trainer.state.log_history if "loss" in e]
    _agree(ours[:1] if loss_type == "orpo" else ours, theirs[:1] if loss_type == "orpo" else theirs, keys)


@pytest.mark.parametrize("case", ["plain", "centred", "margins"])
def test_reward_model_matches_trl_step_by_step(tiny_recipe, tmp_path, case):
    center = 0.05 if case == "centred" else 0.0
    data = {"train": "builtin:pref-synthetic", "max_train_samples": 48, "max_eval_samples": 8}
    if case == "margins":  # Llama 2's margin column, which both take by TRL's name
        rows = load_builtin_dataset("pref-synthetic")["train"].select(range(48)).to_list()
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps({**r, "margin": (i % 3) / 2}) + "\n" for i, r in enumerate(rows)))
        data = {"train": str(path)}
    recipe = tiny_recipe(
        data=data,
        training={"max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "weight_decay": 0.01},
        techniques=[{"name": "reward_model", "center_rewards_coefficient": center}],
    )
    built = build(Recipe.parse(recipe))
    start, pairs = copy.deepcopy(built.model), built.train_dataset
    assert ("margin" in pairs.column_names) == (case == "margins")
    built.trainer.train()
    ours = [e for e in built.trainer.state.log_history if "loss" in e]

    extra = ("margin",) if case == "margins" else ()
    rows = [{"chosen_ids": r["input_ids"], "rejected_ids": r[REJECTED + "input_ids"]} | {k: r[k] for k in extra}
            for r in pairs]  # fmt: skip
    config = trl.RewardConfig(
        max_length=None, center_rewards_coefficient=center or None, **_same_args(built, tmp_path)
    )
    trainer = trl.RewardTrainer(
        model=start, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=built.tokenizer
    )
    trainer.train()
    theirs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(ours) == len(theirs) == STEPS
    for key in ("loss", "margin", "mean_reward"):
        assert [e[key] for e in ours] == pytest.approx([e[key] for e in theirs], **TOLERANCE[key]), key
    assert [e["accuracy"] for e in ours] == [e["accuracy"] for e in theirs]
    assert ours[-1]["loss"] != pytest.approx(ours[0]["loss"], abs=1e-3)  # training moved: not a trivial agreement
