"""Selective backprop (Jiang et al. 2019, arXiv 1910.00762): CDF-based keep probabilities by hand, the expected
kept fraction, gradients equal to those of the kept subset's loss (with the Trainer's num_items_in_batch), the
stock Trainer, and a resume that continues identically."""

from __future__ import annotations

import dataclasses
from functools import partial

import pydantic
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer

from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.trainer import STATE_FILE, EffTrainer
from hf_efftrain.techniques.selective_backprop import (
    SelectiveBackprop,
    SelectiveBackpropConfig,
    SelectiveBackpropTechnique,
    loss_shifts_labels,
    per_example_loss,
    percentile_rank,
)


def test_percentile_rank_by_hand():
    # scipy percentileofscore(kind="rank"): ties get the mean of their ranks; the score itself counts.
    history = torch.tensor([1.0, 2.0, 2.0, 3.0])
    got = percentile_rank(history, torch.tensor([2.0, 3.0, 0.5, 9.0]))
    # 2.0: ranks 2 and 3 -> 2.5/4; 3.0: rank 4 -> 1; 0.5: (0 + 0 + 0)/8 = 0; 9.0: (4 + 4 + 0)/8 = 1
    torch.testing.assert_close(got, torch.tensor([0.625, 1.0, 0.0, 1.0], dtype=torch.float64))


def test_probabilities_by_hand_with_known_history():
    sb = SelectiveBackprop(beta=2.0, history_size=100)
    sb.history.extend([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    probs = sb.probabilities(torch.tensor([2.5, 6.0, 0.5]))
    # history becomes 1..6, 2.5, 6, 0.5 (9 values); CDF: 2.5 -> (3 + 4 + 1)/18, 6 -> (7 + 9 + 1)/18, 0.5 -> 2/18
    expected = torch.tensor([8 / 18, 17 / 18, 2 / 18], dtype=torch.float64) ** 2
    torch.testing.assert_close(probs, expected)
    assert len(sb.history) == 9
    # sampling_min is a floor; the history window drops the oldest losses
    sb = SelectiveBackprop(beta=2.0, history_size=3, sampling_min=0.1)
    sb.history.extend([10.0, 1.0, 2.0])
    probs = sb.probabilities(torch.tensor([0.5]))  # window: 1, 2, 0.5 -> CDF 1/3
    torch.testing.assert_close(probs, torch.tensor([max(0.1, (1 / 3) ** 2)], dtype=torch.float64))
    assert list(sb.history) == [1.0, 2.0, 0.5]


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_expected_fraction_for_stationary_losses(beta):
    # CDF values of i.i.d. losses are uniform, so E[P] = E[U^beta] = 1 / (1 + beta).
    sb = SelectiveBackprop(beta=beta, history_size=512, seed=1)
    g = torch.Generator().manual_seed(0)
    kept = seen = 0
    for _ in range(200):
        keep = sb.select(torch.rand(64, generator=g))
        if _ >= 20:  # after the history has filled
            kept, seen = kept + int(keep.sum()), seen + keep.numel()
    assert kept / seen == pytest.approx(1 / (1 + beta), abs=0.015)


def test_at_least_one_selected_the_largest_loss():
    sb = SelectiveBackprop(beta=100.0, history_size=1000, seed=0)
    sb.history.extend([50.0] * 900)
    losses = torch.tensor([1.0, 3.0, 2.0])
    keep = sb.select(losses)  # every P ~ (1/903)^100 = 0
    assert keep.tolist() == [False, True, False]


def test_per_example_loss_shift_and_classification():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4], [-100, -100, 0, -100]])
    loss, n = per_example_loss(logits, labels, shift=True)
    ce = torch.nn.functional.cross_entropy
    assert n.tolist() == [3, 1]
    torch.testing.assert_close(loss[0], ce(logits[0, :3], labels[0, 1:]))
    torch.testing.assert_close(loss[1], ce(logits[1, 1:2], labels[1, 2:3]))
    loss, n = per_example_loss(logits, labels, shift=False)
    assert n.tolist() == [4, 1]
    torch.testing.assert_close(loss[1], ce(logits[1, 2:3], labels[1, 2:3]))
    cls_logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    loss, n = per_example_loss(cls_logits, torch.tensor([1, 1]), shift=True)
    torch.testing.assert_close(loss, ce(cls_logits, torch.tensor([1, 1]), reduction="none"))
    assert n.tolist() == [1, 1]


def _lm_batch(tiny) -> dict[str, torch.Tensor]:
    rows = tiny.rows(6, seq_len=12, seed=3)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["labels"][0, :5] = -100  # SFT-like prompt
    batch["labels"][1, 8:] = -100  # padding
    batch["attention_mask"][1, 8:] = 0
    return batch


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("with_num_items", [True, False])
def test_gradients_equal_those_of_the_kept_subset(tiny, with_num_items):
    model = tiny.model().train()
    trainer = Trainer(model=model, args=tiny.args())
    batch = _lm_batch(tiny)
    assert loss_shifts_labels(model)
    n_all = batch["labels"][:, 1:].ne(-100).sum()  # what the Trainer counts for one micro-batch
    compute = partial(trainer.compute_loss, num_items_in_batch=n_all) if with_num_items else trainer.compute_loss
    sb = SelectiveBackprop(beta=1.0, seed=0)
    loss = sb.loss(model, batch, compute)
    keep = sb.last_keep
    assert 0 < keep.sum() < 6, keep
    loss.backward()
    got = _grads(model)

    # Reference: the plain model loss (mean over target tokens) of the kept rows only.
    ref = model(**{k: v[keep] for k, v in batch.items()}).loss
    torch.testing.assert_close(loss, ref)
    ref.backward()
    for a, b in zip(got, _grads(model)):
        torch.testing.assert_close(a, b)
    assert sb.counts["examples_seen"] == 6 and sb.counts["examples_backpropagated"] == int(keep.sum())


def test_num_items_over_two_micro_batches_halves_the_loss(tiny):
    # With gradient accumulation the Trainer's count covers both micro-batches: each contributes half its mean.
    model = tiny.model().train()
    trainer = Trainer(model=model, args=tiny.args())
    batch = _lm_batch(tiny)
    n_all = batch["labels"][:, 1:].ne(-100).sum()
    sb = SelectiveBackprop(beta=1.0, seed=0)
    state = sb.state_dict()
    single = sb.loss(model, batch, partial(trainer.compute_loss, num_items_in_batch=n_all))
    sb.load_state_dict(state)
    double = sb.loss(model, batch, partial(trainer.compute_loss, num_items_in_batch=2 * n_all))
    torch.testing.assert_close(double, single / 2)


def test_classification_subset_gradients():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = BertForSequenceClassification(config).train()
    batch = {
        "input_ids": torch.randint(5, 50, (8, 7)),
        "attention_mask": torch.ones(8, 7, dtype=torch.long),
        "labels": torch.randint(0, 3, (8,)),
    }
    assert not loss_shifts_labels(model)
    sb = SelectiveBackprop(beta=1.0, seed=2)
    loss = sb.loss(model, batch, lambda m, b, **kw: m(**b).loss)
    keep = sb.last_keep
    assert 0 < keep.sum() < 8
    loss.backward()
    got = _grads(model)
    model(**{k: v[keep] for k, v in batch.items()}).loss.backward()
    for a, b in zip(got, _grads(model)):
        torch.testing.assert_close(a, b)


def test_stock_trainer_install_and_undo(tiny):
    trainer = Trainer(model=tiny.model(), args=tiny.args(max_steps=4), train_dataset=tiny.rows(32))
    sb = SelectiveBackprop(beta=2.0, seed=0)
    handle = sb.install(trainer)
    trainer.train()
    assert 0 < sb.fraction_backpropagated() < 1
    assert sb.counts["examples_seen"] == 32
    assert all(torch.isfinite(torch.tensor(tiny.losses(trainer))))
    handle.undo()
    assert "compute_loss" not in vars(trainer) and trainer.compute_loss.__func__ is Trainer.compute_loss


def test_state_dict_round_trip_continues_identically():
    a = SelectiveBackprop(beta=1.0, history_size=16, seed=5)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, generator=g) for _ in range(6)]
    for x in batches[:3]:
        a.select(x)
    b = SelectiveBackprop(beta=1.0, history_size=16, seed=99)
    b.load_state_dict(a.state_dict())
    for x in batches[3:]:
        assert torch.equal(a.select(x), b.select(x))
    assert list(a.history) == list(b.history) and a.counts == b.counts


def _eff_run(tiny, out, resume=None):
    tech = SelectiveBackpropTechnique(beta=1.0, history_size=64)
    args = dataclasses.replace(tiny.args(max_steps=4, save_strategy="steps", save_steps=2), output_dir=str(out))
    trainer = EffTrainer(model=tiny.model(), args=args, train_dataset=tiny.rows(64), techniques=[tech])
    trainer.train(resume_from_checkpoint=resume)
    return tech, {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_resume_from_checkpoint_continues_identically(tiny, tmp_path):
    tech, losses = _eff_run(tiny, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / STATE_FILE).exists()
    resumed, resumed_losses = _eff_run(tiny, tmp_path / "resumed", resume=str(checkpoint))
    assert sorted(resumed_losses) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's log history
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-6)
    assert resumed.report() == tech.report()
    assert list(resumed.core.history) == list(tech.core.history)
    assert 0 < tech.report()["fraction_backpropagated"] < 1


def test_config_and_contract():
    assert get_technique("selective_backprop") is SelectiveBackpropTechnique
    assert "1910.00762" in SelectiveBackpropTechnique.paper
    for field_name, field in SelectiveBackpropConfig.model_fields.items():
        assert field_name == "name" or field.description
    for bad in ({"beta": -1}, {"history_size": 0}, {"sampling_min": 1.5}, {"bogus": 1}):
        with pytest.raises(pydantic.ValidationError):
            SelectiveBackpropConfig(**bad)
    with pytest.raises(ValueError):
        SelectiveBackprop(beta=-1)
