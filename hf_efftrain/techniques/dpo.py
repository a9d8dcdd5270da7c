"""Direct Preference Optimization: Rafailov et al. 2023, "Your Language Model is Secretly a Reward Model"
(arXiv 2305.18290), on preference pairs (``data.format: preference``, ``core/data/preference.py``).

With ``h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]`` (chosen ``y_w``, rejected ``y_l``;
``log pi(y|x)``: the sum of the response tokens' log-probabilities), the loss per pair is

- ``sigmoid`` (the paper's eq. 7): ``-log sigmoid(beta h)``; with ``label_smoothing`` eps (conservative DPO, the
  labels flipped with probability eps): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
- ``ipo`` (Azar et al. 2023, arXiv 2310.12036, eq. 17): ``(h - 1 / (2 beta))^2``, with per-token mean log-probs
  (as TRL computes it).

The implicit rewards ``beta (log pi - log ref)`` of each side are logged as TRL names them (``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``). The reference is the model as loaded (adapters
disabled): its log-probabilities are computed once, before training, in one forward pass over the train and eval
pairs, and travel with each pair (TRL's ``precompute_ref_log_probs``). No second model is kept in memory and no
step pays a reference forward. Dropout is off by default (TRL's ``disable_dropout``): the policy at step 0 then
scores exactly as the reference, and the first loss is ``log 2``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..core.registry import register_technique
from ..core.technique import ORDER_WRAPPER, Technique, TechniqueConfig
from ..errors import RecipeError
from .selective_backprop import per_example_loss

logger = logging.getLogger(__name__)

REF = "ref_logps"  # the column of each pair's reference log-probabilities (chosen, rejected)
INPUTS = ("input_ids", "attention_mask")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label_t | < t) over each row's labelled tokens, their count); labels shift by one."""
    mean_ce, count = per_example_loss(logits, labels, shift=True)
    return -mean_ce * count, count


def dpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, rewards per pair and side) from (B, 2) log-probabilities: column 0 chosen, 1 rejected."""
    ratios = policy - reference
    h = ratios[:, 0] - ratios[:, 1]
    if loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, beta * ratios.detach()


def pair_logps(model: torch.nn.Module, batch: dict[str, Any], mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) log-probabilities of a collated preference batch (2B rows: the chosen, then the rejected) and the
    (B, 2) counts of response tokens; ``mean``: per token."""
    logits = model(**{k: batch[k] for k in INPUTS if k in batch}, use_cache=False).logits
    total, count = sequence_logps(logits, batch["labels"])
    b = total.shape[0] // 2
    total, count = torch.stack([total[:b], total[b:]], 1), torch.stack([count[:b], count[b:]], 1)
    return (total / count.clamp(min=1) if mean else total), count


def reference_logps(model, dataset, collator, batch_size: int, context=contextlib.nullcontext) -> list[list[float]]:
    """Each pair's summed (chosen, rejected) log-probabilities under ``model`` in eval mode, adapters disabled."""
    was_training = model.training
    model.eval()
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    device = next(model.parameters()).device
    out: list[list[float]] = []
    try:
        with torch.no_grad(), adapters_off, context():
            for start in range(0, len(dataset), batch_size):
                rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
                batch = {k: v.to(device) for k, v in collator(list(rows)).items() if torch.is_tensor(v)}
                out += pair_logps(model, batch, mean=False)[0].tolist()
    finally:
        model.train(was_training)
    return out


class DpoConfig(TechniqueConfig):
    beta: float = Field(0.1, gt=0, le=100, description="how far the policy may move from the reference (beta)")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO (eq. 7); ipo: Azar et al.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid only: the chance a pair's labels are flipped (conservative DPO)"
    )
    disable_dropout: bool = Field(
        True, description="set every dropout to 0 (the policy starts equal to the reference)"
    )
    reference_batch_size: int | None = Field(
        None, ge=1, description="pairs per forward of the reference pass; default training.per_device_eval_batch_size"
    )


@register_technique
class DpoTechnique(Technique):
    name = "dpo"
    Config = DpoConfig
    survey_section = "Fine-tuning objective (preference pairs; beyond the survey)"
    paper = "Rafailov et al. 2023 (arXiv 2305.18290)"
    objective = "preference"
    # Each changes the rows or the loss that the pair's log-probabilities need whole (or drops pairs by an LM loss).
    conflicts = frozenset(
        {"packing", "seqlen_warmup", "token_dropping", "token_masking", "selective_backprop", "data_pruning",
         "layer_dropping", "fused_kernels", "progressive_stacking", "generation_samples"}
    )  # fmt: skip
    order = ORDER_WRAPPER  # sees the final model (after PEFT): dropout off in the adapters too

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.trainer = None
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.reference_seconds: float | None = None

    def validate(self, recipe, env) -> None:
        c = self.config
        if recipe.model.task not in ("auto", "preference"):
            raise RecipeError(
                "model.task", f"dpo trains on preference pairs (model.task preference), not {recipe.model.task}"
            )
        if c.label_smoothing and c.loss_type != "sigmoid":
            raise RecipeError("label_smoothing", f"applies to loss_type sigmoid, not {c.loss_type}")
        stage = ((env.deepspeed_config or {}).get("zero_optimization") or {}).get("stage")
        if env.distributed_type == "FSDP" or stage == 3:
            raise RecipeError(
                "",
                "dpo's reference pass runs the whole model before training, which ZeRO-3 and FSDP shard; use DDP or "
                "ZeRO-1/2 (with LoRA or QLoRA the model is small)",
            )

    def training_args(self, args):
        args.remove_unused_columns = False  # the rejected side and the reference log-probs ride in extra columns
        return args

    def on_model(self, model):
        if self.config.disable_dropout:
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        return model

    def on_trainer(self, trainer) -> None:
        self.trainer = trainer
        trainer.loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides by accumulation steps
        model = trainer.model
        if next(model.parameters()).is_meta:  # hf-efftrain validate: no weights to score with
            return
        size = self.config.reference_batch_size or trainer.args.per_device_eval_batch_size
        start = time.perf_counter()
        for attr in ("train_dataset", "eval_dataset"):
            dataset = getattr(trainer, attr)
            if dataset is None:
                continue
            if REF in dataset.column_names:
                dataset = dataset.remove_columns(REF)
            logps = reference_logps(model, dataset, trainer.data_collator, size, trainer.accelerator.autocast)
            setattr(trainer, attr, dataset.add_column(REF, logps))
        self.reference_seconds = time.perf_counter() - start
        logger.info("dpo: reference log-probs of every pair in %.1fs", self.reference_seconds)

    def loss(self, model, batch, compute_loss):
        if REF not in batch:
            raise RecipeError(
                "techniques", "dpo: a batch without reference log-probs (the reference pass did not run)"
            )
        c = self.config
        mean = c.loss_type == "ipo"
        policy, count = pair_logps(model, batch, mean)
        reference = batch[REF].to(policy.device)
        if mean:
            reference = reference / count.clamp(min=1)
        loss, rewards = dpo_loss(policy, reference, c.beta, c.loss_type, c.label_smoothing)
        self._add("train" if model.training else "eval", rewards, policy.detach())
        return loss.mean()

    def _add(self, split: str, rewards: torch.Tensor, logps: torch.Tensor) -> None:
        values = {
            "rewards/chosen": rewards[:, 0],
            "rewards/rejected": rewards[:, 1],
            "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float(),
            "rewards/margins": rewards[:, 0] - rewards[:, 1],
            "logps/chosen": logps[:, 0],
            "logps/rejected": logps[:, 1],
        }
        sums = self.sums.setdefault(split, {})
        for k, v in values.items():
            sums[k] = sums.get(k, 0) + v.sum().float()
        sums["pairs"] = sums.get("pairs", 0) + torch.tensor(float(rewards.shape[0]), device=rewards.device)

    def metrics(self, split: str) -> dict[str, float]:
        sums = self.sums.pop(split, None)
        if not sums:
            return {}
        names = list(sums)
        total = torch.stack([sums[k] for k in names])
        if self.trainer is not None and self.trainer.accelerator.num_processes > 1:
            total = self.trainer.accelerator.reduce(total, "sum")  # every rank logs: the same numbers everywhere
        pairs = total[names.index("pairs")].clamp(min=1)
        return {k: round(float(v / pairs), 4) for k, v in zip(names, total) if k != "pairs"}

    def report(self) -> dict[str, Any]:
        return {
            "reference": "the model as loaded (adapters disabled), precomputed",
            "reference_pass_seconds": (None if self.reference_seconds is None else round(self.reference_seconds, 2)),
        }
