"""Evaluation metrics per task, through the Trainer's own ``compute_metrics`` and ``preprocess_logits_for_metrics``.

``argmax_ids`` reduces each evaluation batch's logits to the predicted ids as the Trainer collects them, so an
evaluation keeps ``[batch, seq]`` integers and never ``[batch, seq, vocab]`` floats. ``TaskMetrics(task)`` then
scores them (the Trainer adds the ``eval_`` prefix):

- classification: ``accuracy``, and ``macro_f1``: scikit-learn's ``f1_score(average="macro")``, the unweighted mean
  of the per-class F1 over the classes present in the labels or the predictions.
- causal_lm, sft: ``token_accuracy``, the share of label tokens (label != -100) that the argmax one position
  earlier predicts: logits at t predict the label at t+1, the shift of transformers' ``ForCausalLMLoss``.
- masked_lm, seq2seq: ``token_accuracy`` without a shift (the masked positions; decoder logits are aligned with
  their labels, as in ``ForMaskedLMLoss`` and the seq2seq heads).

Perplexity is not computed here: the Trainer already reports ``eval_loss``, the mean token cross-entropy of the
token tasks, and the run report derives ``exp(eval_loss)`` from it (``runtime/metrics.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100  # label of the tokens without a loss; the Trainer also pads predictions and labels with it
SHIFTED_TASKS = ("causal_lm", "sft")
TOKEN_TASKS = ("causal_lm", "sft", "masked_lm", "seq2seq")


def argmax_ids(logits: Any, labels: Any = None) -> Any:
    """``preprocess_logits_for_metrics``: the predicted id at each position (``[batch, seq]``; ``[batch]`` for a
    classifier). A tuple of outputs (seq2seq: logits, encoder states) gives the argmax of its first entry."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


def accuracy(preds: Any, labels: Any) -> float:
    preds, labels = _numpy(preds).ravel(), _numpy(labels).ravel()
    return float((preds == labels).mean())


def macro_f1(preds: Any, labels: Any) -> float:
    """Unweighted mean F1 over the classes seen in ``labels`` or ``preds`` (a class with no true positive: 0)."""
    from sklearn.metrics import f1_score

    return float(f1_score(_numpy(labels).ravel(), _numpy(preds).ravel(), average="macro", zero_division=0))


def token_counts(preds: Any, labels: Any, shift: bool) -> tuple[int, int]:
    """(correct, counted) label tokens of one batch; ``shift``: the prediction at t is scored against label t+1."""
    preds, labels = _numpy(preds), _numpy(labels)
    if shift:
        preds, labels = preds[..., :-1], labels[..., 1:]
    counted = labels != IGNORE_INDEX
    return int((preds == labels)[counted].sum()), int(counted.sum())


class TaskMetrics:
    """``compute_metrics`` for one task. Scores the whole evaluation set at once (the default), or batch by batch
    when ``training.batch_eval_metrics`` is set: the Trainer then passes ``compute_result=False`` until the last
    batch, and only counts (token tasks) or one id per row (classification) are kept in between."""

    def __init__(self, task: str):
        if task not in TOKEN_TASKS and task != "classification":
            raise ValueError(f"no metrics for task {task!r}")
        self.task = task
        self._reset()

    def _reset(self) -> None:
        self._correct = self._counted = 0
        self._preds: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        # eval_do_concat_batches=False hands one array per batch
        for p, y in zip(preds, labels) if isinstance(preds, list) else [(preds, labels)]:
            if self.task == "classification":
                self._preds.append(_numpy(p).ravel())
                self._labels.append(_numpy(y).ravel())
            else:
                correct, counted = token_counts(p, y, shift=self.task in SHIFTED_TASKS)
                self._correct, self._counted = self._correct + correct, self._counted + counted
        if not compute_result:
            return {}
        try:
            return self._result()
        finally:
            self._reset()

    def _result(self) -> dict[str, float]:
        if self.task == "classification":
            preds, labels = np.concatenate(self._preds), np.concatenate(self._labels)
            return {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels)} if labels.size else {}
        return {"token_accuracy": self._correct / self._counted} if self._counted else {}


def metric_kwargs(task: str) -> dict[str, Any]:
    """The ``Trainer(...)`` arguments that score ``task``'s evaluations (none for a task without metrics here)."""
    if task not in TOKEN_TASKS and task != "classification":
        return {}
    return {"compute_metrics": TaskMetrics(task), "preprocess_logits_for_metrics": argmax_ids}


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor: batch_eval_metrics passes the gathered batch as it is
        return x.detach().cpu().numpy()
    return np.asarray(x)
