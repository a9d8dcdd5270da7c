"""core/evaluation.py and the run report's eval metrics: accuracy, macro-F1 and token accuracy against hand
computations, the causal shift of transformers' loss, no vocab-sized tensor kept by an evaluation, and real tiny runs
(EffTrainer, the stock-Trainer baseline, run_report.json, the summary table) whose numbers are recomputed by hand."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_efftrain import Recipe, train
from hf_efftrain.core.build import build
from hf_efftrain.core.evaluation import (
    TaskMetrics,
    accuracy,
    argmax_ids,
    macro_f1,
    metric_kwargs,
    token_counts,
)
from hf_efftrain.runtime.metrics import build_run_report, eval_metrics, summary_table

VOCAB = 64


def reference_macro_f1(preds: list[int], labels: list[int]) -> float:
    """Macro-F1 from its definition: per class F1 = 2TP / (2TP + FP + FN), averaged over the classes that occur in
    the labels or the predictions."""
    scores = []
    for c in sorted(set(labels) | set(preds)):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


# ---- the metric functions ---------------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    labels = [0, 0, 1, 1, 2, 2, 2]
    preds = [0, 1, 1, 1, 2, 0, 2]
    # class 0: TP 1, FP 1, FN 1 -> F1 1/2; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 2, FP 0, FN 1 -> 4/5
    assert accuracy(preds, labels) == pytest.approx(5 / 7)
    assert macro_f1(preds, labels) == pytest.approx((1 / 2 + 4 / 5 + 4 / 5) / 3)
    # A class that is only predicted (3) counts with F1 0; unweighted, so the rare class weighs like the others.
    assert macro_f1([0, 0, 3, 1], [0, 0, 1, 1]) == pytest.approx((1 + 0 + 2 / 3) / 3)
    metrics = TaskMetrics("classification")(EvalPrediction(np.array(preds), np.array(labels)))
    assert metrics == pytest.approx({"accuracy": 5 / 7, "macro_f1": 0.7})


def test_macro_f1_matches_the_definition_on_random_labels():
    rng = random.Random(0)
    for _ in range(20):
        n, k = rng.randint(1, 40), rng.randint(2, 6)
        labels = [rng.randrange(k) for _ in range(n)]
        preds = [y if rng.random() < 0.6 else rng.randrange(k) for y in labels]
        assert macro_f1(preds, labels) == pytest.approx(reference_macro_f1(preds, labels))


def test_token_accuracy_uses_the_causal_shift_and_ignores_minus_100():
    labels = np.array([[-100, 5, 6, 7, -100]])
    preds = np.array([[5, 6, 9, 0, 3]])
    # shifted: predictions 5, 6, 9 (positions 0..2) against labels 5, 6, 7 (positions 1..3); position 4 is -100
    assert token_counts(preds, labels, shift=True) == (2, 3)
    # unshifted (masked LM, seq2seq): 6, 9, 0 against 5, 6, 7
    assert token_counts(preds, labels, shift=False) == (0, 3)
    # what is predicted where the label is -100 does not count
    other = np.array([[5, 6, 9, 7, 1]])
    assert token_counts(other, labels, shift=True) == (2, 3)
    assert TaskMetrics("sft")(EvalPrediction(preds, labels)) == {"token_accuracy": pytest.approx(2 / 3)}
    assert TaskMetrics("masked_lm")(EvalPrediction(preds, labels)) == {"token_accuracy": 0.0}


def test_the_shift_is_the_one_of_the_causal_lm_loss():
    """Logits that put all their mass on the label one position later: transformers' causal LM loss is ~0, and so
    the token accuracy is exactly 1; the same logits read without the shift score (almost) nothing."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, VOCAB, (3, 9), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    logits = torch.full((3, 9, VOCAB), -30.0)
    nxt = torch.cat([labels[:, 1:], torch.zeros(3, 1, dtype=torch.long)], dim=1).clamp(min=0)
    logits.scatter_(2, nxt.unsqueeze(-1), 30.0)
    assert ForCausalLMLoss(logits, labels, vocab_size=VOCAB).item() < 1e-6
    preds = argmax_ids(logits, labels)
    correct, counted = token_counts(preds, labels, shift=True)
    assert correct == counted == int((labels[:, 1:] != -100).sum())
    assert token_counts(preds, labels, shift=False)[0] < counted // 2


def test_argmax_ids_has_no_vocab_dimension():
    logits = torch.randn(2, 7, VOCAB)
    labels = torch.zeros(2, 7, dtype=torch.long)
    ids = argmax_ids(logits, labels)
    assert ids.shape == labels.shape and ids.dtype == torch.long
    assert torch.equal(ids, logits.argmax(-1))
    encoder_states = torch.randn(2, 5, 16)  # seq2seq outputs: (logits, encoder_last_hidden_state)
    assert torch.equal(argmax_ids((logits, encoder_states), labels), ids)
    assert argmax_ids(torch.randn(4, 3), torch.zeros(4)).shape == (4,)  # a classifier: one id per row


def test_batch_by_batch_and_unconcatenated_batches_give_the_whole_set_result():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 4, (3, 6), generator=g), torch.randint(-1, 4, (3, 6), generator=g)) for _ in range(3)]
    batches = [(p, y.masked_fill(y < 0, -100)) for p, y in batches]
    whole = TaskMetrics("causal_lm")(
        EvalPrediction(torch.cat([p for p, _ in batches]).numpy(), torch.cat([y for _, y in batches]).numpy())
    )
    streamed = TaskMetrics("causal_lm")
    results = [streamed(EvalPrediction(p, y), compute_result=i == 2) for i, (p, y) in enumerate(batches)]
    assert results[:2] == [{}, {}] and results[2] == pytest.approx(whole)
    listed = TaskMetrics("causal_lm")(EvalPrediction([p.numpy() for p, _ in batches], [y.numpy() for _, y in batches]))
    assert listed == pytest.approx(whole)
    # the state is reset after a result: a second evaluation is not mixed with the first
    assert streamed(EvalPrediction(*batches[0]), compute_result=True) == TaskMetrics("causal_lm")(
        EvalPrediction(*batches[0])
    )


def test_metric_kwargs_per_task():
    assert set(metric_kwargs("causal_lm")) == {"compute_metrics", "preprocess_logits_for_metrics"}
    assert metric_kwargs("some_future_task") == {}
    with pytest.raises(ValueError):
        TaskMetrics("some_future_task")


# ---- inside a real evaluation -------------------------------------------------------------------------------------


def _rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Rows of different lengths, some with a -100 prompt, so batches are padded by the collator and the Trainer."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
        labels = ids.clone()
        labels[: i % 3] = -100
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels.tolist()})
    return rows


def _trainer(tmp_path: Path, **args) -> Trainer:
    from transformers import DataCollatorForSeq2Seq

    from hf_efftrain.builtins import get_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    training_args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=4, disable_tqdm=True,
        **args,
    )  # fmt: skip
    return Trainer(
        model=LlamaForCausalLM._from_config(config),
        args=training_args,
        eval_dataset=_rows(10, seed=2),
        data_collator=DataCollatorForSeq2Seq(get_tokenizer(), label_pad_token_id=-100),
        **metric_kwargs("causal_lm"),
    )


def _token_accuracy_by_hand(model, rows) -> float:
    """Each row alone (no padding at all): argmax at t against the label at t+1."""
    correct = counted = 0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor(row["labels"])
            pred = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].argmax(-1)
            keep = labels[1:] != -100
            correct += int((pred[:-1] == labels[1:])[keep].sum())
            counted += int(keep.sum())
    return correct / counted


def test_real_evaluation_keeps_ids_only_and_matches_a_hand_computation(tmp_path):
    trainer = _trainer(tmp_path)
    seen = []

    def recording(logits, labels):
        ids = argmax_ids(logits, labels)
        seen.append((tuple(logits.shape), tuple(ids.shape), tuple(labels.shape)))
        return ids

    trainer.preprocess_logits_for_metrics = recording
    metrics = trainer.evaluate()
    assert len(seen) == 3  # 10 rows in batches of 4
    for logits_shape, ids_shape, labels_shape in seen:
        assert logits_shape[-1] == VOCAB and ids_shape == labels_shape and len(ids_shape) == 2
    model = trainer.model.eval()
    assert metrics["eval_token_accuracy"] == pytest.approx(_token_accuracy_by_hand(model, trainer.eval_dataset))
    # batch_eval_metrics: the same number from per-batch counts
    streamed = _trainer(tmp_path, batch_eval_metrics=True).evaluate()
    assert streamed["eval_token_accuracy"] == pytest.approx(metrics["eval_token_accuracy"])


def test_eval_metrics_of_a_log_history():
    history = [
        {"eval_loss": 3.0, "eval_token_accuracy": 0.1, "eval_runtime": 1.0, "step": 2},
        {"loss": 2.5, "step": 3},
        {"eval_loss": 2.0, "eval_token_accuracy": 0.25, "eval_runtime": 1.0, "eval_samples_per_second": 9.0,
         "eval_mem_cpu_alloc_delta": 5, "epoch": 1.0, "step": 4},
        {"generation_samples": "text", "step": 4},
    ]  # fmt: skip
    out = eval_metrics(history, "causal_lm")
    assert out == {"eval_loss": 2.0, "eval_token_accuracy": 0.25, "eval_perplexity": pytest.approx(math.exp(2.0))}
    assert "eval_perplexity" not in eval_metrics(history, "classification")
    assert eval_metrics([], "sft") == {"eval_loss": None, "eval_perplexity": None}
    assert eval_metrics([{"eval_loss": 1e4}], "sft")["eval_perplexity"] is None  # exp overflows: no number


# ---- real runs: EffTrainer, the stock-Trainer baseline, run_report.json ----------------------------------------


def test_causal_run_report_has_token_accuracy_and_perplexity(tiny_recipe):
    recipe = tiny_recipe(training={"max_steps": 3, "eval_strategy": "steps", "eval_steps": 2})
    report = train(Recipe.parse(recipe))
    on_disk = json.loads((Path(recipe["training"]["output_dir"]) / "run_report.json").read_text())
    for r in (report, on_disk):
        assert 0 <= r["eval_token_accuracy"] <= 1
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert r["eval_token_accuracy"] == r["eval"]["eval_token_accuracy"]  # the final evaluation's
        assert "eval_accuracy" not in r and "eval_runtime" not in r
    table = summary_table(report)
    assert f"{report['eval_perplexity']:,.2f}" in table and f"{100 * report['eval_token_accuracy']:.2f} %" in table
    assert "eval accuracy" not in table


def test_sft_metrics_match_by_hand_and_the_baseline_reports_the_same(tiny_recipe):
    built = build(Recipe.parse(tiny_recipe(data={"train": "builtin:sft-synthetic"}, training={"max_steps": 2})))
    assert built.task == "sft"
    built.trainer.train()
    metrics = built.trainer.evaluate()
    model = built.model.eval()
    assert metrics["eval_token_accuracy"] == pytest.approx(_token_accuracy_by_hand(model, built.eval_dataset))
    plain = built.plain_trainer()
    assert type(plain) is Trainer
    assert plain.evaluate()["eval_token_accuracy"] == pytest.approx(metrics["eval_token_accuracy"])


def test_classification_accuracy_and_macro_f1_match_by_hand(tiny_recipe):
    recipe = tiny_recipe(
        model={"name_or_path": "builtin:tiny-bert", "config_overrides": {"num_hidden_layers": 2}},
        data={"train": "builtin:cls-synthetic"},
        training={"max_steps": 4},
    )
    built = build(Recipe.parse(recipe))
    assert built.task == "classification"
    output = built.trainer.train()
    metrics = built.trainer.evaluate()
    model = built.model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for row in built.eval_dataset:
            preds.append(int(model(input_ids=torch.tensor([row["input_ids"]])).logits.argmax(-1)))
            labels.append(int(row["labels"]))
    assert metrics["eval_accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels))
    assert metrics["eval_macro_f1"] == pytest.approx(reference_macro_f1(preds, labels))
    report = build_run_report(built.trainer, output, built.techniques, 32, {"task": built.task})
    assert report["eval_accuracy"] == metrics["eval_accuracy"] and report["eval_macro_f1"] == metrics["eval_macro_f1"]
    assert "eval_perplexity" not in report and "eval_token_accuracy" not in report
    table = summary_table(report)
    assert f"{100 * metrics['eval_accuracy']:.2f} %" in table and f"{metrics['eval_macro_f1']:.4f}" in table
