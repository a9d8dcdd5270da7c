"""Direct Preference Optimization: Rafailov et al. 2023, "Your Language Model is Secretly a Reward Model"
(arXiv 2305.18290), on preference pairs (``data.format: preference``, ``core/data/preference.py``).

With ``h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]`` (chosen ``y_w``, rejected ``y_l``;
``log pi(y|x)``: the sum of the response tokens' log-probabilities), the loss per pair is

- ``sigmoid`` (the paper's eq. 7): ``-log sigmoid(beta h)``; with ``label_smoothing`` eps (conservative DPO, the
  labels flipped with probability eps): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
- ``ipo`` (Azar et al. 2023, arXiv 2310.12036, eq. 17): ``(h - 1 / (2 beta))^2``, with per-token mean log-probs
  (as TRL computes it).

Two reference-free objectives use per-token mean log-probs ``m = log pi(y|x) / |y|`` and ``h = m_w - m_l``:

- ``simpo`` (Meng et al. 2024, arXiv 2405.14734, eq. 6): ``-log sigmoid(beta h - gamma)``, with the target reward
  margin ``gamma`` (``simpo_gamma``; label smoothing as for sigmoid);
- ``orpo`` (Hong et al. 2024, arXiv 2403.07691, eqs. 1-7): ``-m_w - lambda log sigmoid(log odds(y_w) - log
  odds(y_l))`` with ``odds = P / (1 - P)``, ``P = exp(m)``, ``lambda = beta``: SFT on the chosen response (the
  paper's length-normalised NLL given the prompt) and preference in one stage, from a base model. TRL's ORPOTrainer
  takes its NLL over prompt and response; this follows the paper (and LLaMA-Factory): the response only.

The implicit rewards (``beta (log pi - log ref)`` on summed log-probs, for ipo too; reference-free: ``beta m``) of
each side are logged as TRL names them (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``; ``tests/techniques/test_vs_trl.py`` checks them and the loss against TRL's ``DPOTrainer``).
The reference is the model as loaded (adapters disabled): its log-probabilities are computed once, before training,
in one forward pass over the train and eval pairs (sharded over the processes), and travel with each pair (TRL's
``precompute_ref_log_probs``). No second model is kept in memory and no step pays a reference forward. Dropout is off
by default (TRL's ``disable_dropout``): the policy at step 0 then scores exactly as the reference, and the first DPO
loss is ``log 2``.
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
REFERENCE_FREE = ("simpo", "orpo")
MEAN = ("ipo", *REFERENCE_FREE)  # the objectives on per-token mean log-probabilities
BETA = {"simpo": 2.0}  # the default beta per loss_type (SimPO's paper uses 2-10; DPO, IPO and ORPO's lambda 0.1)
# The techniques a pair objective (dpo, reward_model) refuses: each changes the rows or the loss that a pair needs
# whole (or drops pairs by an LM loss).
PAIR_CONFLICTS = frozenset(
    {"packing", "seqlen_warmup", "token_dropping", "token_masking", "selective_backprop", "data_pruning",
     "layer_dropping", "fused_kernels", "progressive_stacking", "generation_samples"}
)  # fmt: skip


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label_t | < t) over each row's labelled tokens, their count); labels shift by one."""
    mean_ce, count = per_example_loss(logits, labels, shift=True)
    return -mean_ce * count, count


def dpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, rewards per pair and side) from (B, 2) log-probabilities: column 0 chosen, 1 rejected.
    ``reference`` is None for the reference-free types; ``orpo``'s NLL term is the caller's (it needs the counts)."""
    ratios = policy if loss_type in REFERENCE_FREE else policy - reference
    h = ratios[:, 0] - ratios[:, 1]
    if loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "orpo":
        # log odds = m - log(1 - exp(m)); m < 0 strictly, else the odds are infinite
        m = policy.clamp(max=-1e-6)
        log_odds = h - (torch.log(-torch.expm1(m[:, 0])) - torch.log(-torch.expm1(m[:, 1])))
        loss = -beta * F.logsigmoid(log_odds)
    else:
        z = beta * h - (gamma if loss_type == "simpo" else 0.0)
        loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * ratios.detach()


def pair_logps(model: torch.nn.Module, batch: dict[str, Any], mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) log-probabilities of a collated preference batch (2B rows: the chosen, then the rejected) and the
    (B, 2) counts of response tokens; ``mean``: per token."""
    logits = model(**{k: batch[k] for k in INPUTS if k in batch}, use_cache=False).logits
    total, count = sequence_logps(logits, batch["labels"])
    b = total.shape[0] // 2
    total, count = torch.stack([total[:b], total[b:]], 1), torch.stack([count[:b], count[b:]], 1)
    return (total / count.clamp(min=1) if mean else total), count


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of ``model`` set to 0 (TRL's ``disable_dropout``, its DPO and reward trainers' default)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def process_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of ``n`` that process ``rank`` of ``world`` scores (the last may hold fewer)."""
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


def reference_logps(model, dataset, collator, batch_size: int, accelerator=None) -> list[list[float]]:
    """Each pair's summed (chosen, rejected) log-probabilities under ``model`` in eval mode, adapters disabled.
    With an ``accelerator`` each process scores its contiguous share, under its autocast, and all gather the list."""
    was_training = model.training
    model.eval()
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    context = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    world = accelerator.num_processes if accelerator is not None else 1
    lo, hi = process_share(len(dataset), accelerator.process_index if world > 1 else 0, world)
    device = next(model.parameters()).device
    out: list[list[float]] = []
    try:
        with torch.no_grad(), adapters_off, context:
            for start in range(lo, hi, batch_size):
                rows = dataset.select(range(start, min(start + batch_size, hi)))
                batch = {k: v.to(device) for k, v in collator(list(rows)).items() if torch.is_tensor(v)}
                out += pair_logps(model, batch, mean=False)[0].tolist()
    finally:
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        out = gather_object(out)  # the shares, in rank order: the dataset's order
    return out


class PairMeans:
    """Numbers logged per pair (dpo's rewards, reward_model's accuracy): summed per split between logs, then averaged
    over the pairs of every process (each rank logs the same numbers)."""

    def __init__(self):
        self.sums: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, split: str, values: dict[str, torch.Tensor]) -> None:
        """``values``: name -> one value per pair of the batch."""
        sums = self.sums.setdefault(split, {})
        for k, v in values.items():
            sums[k] = sums.get(k, 0) + v.sum().float()
        sums["pairs"] = sums.get("pairs", 0) + torch.tensor(float(v.shape[0]), device=v.device)

    def pop(self, split: str, accelerator=None) -> dict[str, float]:
        sums = self.sums.pop(split, None)
        if not sums:
            return {}
        names = list(sums)
        total = torch.stack([sums[k] for k in names])
        if accelerator is not None and accelerator.num_processes > 1:
            total = accelerator.reduce(total, "sum")
        pairs = total[names.index("pairs")].clamp(min=1)
        return {k: round(float(v / pairs), 4) for k, v in zip(names, total) if k != "pairs"}


class PairObjective(Technique):
    """What dpo and reward_model share: extra columns kept, dropout off (``config.disable_dropout``), a loss that
    is a mean per micro-batch, and numbers logged per pair (``self.logged``)."""

    conflicts = PAIR_CONFLICTS
    order = ORDER_WRAPPER  # sees the final model (after PEFT): dropout off in the adapters too

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.trainer = None
        self.logged = PairMeans()

    def training_args(self, args):
        args.remove_unused_columns = False  # the rejected side (and reference log-probs, margins) in extra columns
        return args

    def on_model(self, model):
        return disable_dropout(model) if self.config.disable_dropout else model

    def on_trainer(self, trainer) -> None:
        self.trainer = trainer
        trainer.loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides by accumulation steps

    def metrics(self, split: str) -> dict[str, float]:
        return self.logged.pop(split, self.trainer.accelerator if self.trainer is not None else None)


class DpoConfig(TechniqueConfig):
    beta: float | None = Field(
        None, gt=0, le=100, description="the reward scale (orpo: lambda); default 0.1, simpo 2.0"
    )
    loss_type: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid", description="sigmoid: DPO (eq. 7); ipo: Azar et al.; simpo, orpo: reference-free"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid, simpo: the chance a pair's labels are flipped (conservative DPO)"
    )
    simpo_gamma: float = Field(0.5, ge=0, le=100, description="simpo: the target reward margin (gamma)")
    disable_dropout: bool = Field(
        True, description="set every dropout to 0 (the policy starts equal to the reference)"
    )
    reference_batch_size: int | None = Field(
        None, ge=1, description="pairs per forward of the reference pass; default training.per_device_eval_batch_size"
    )


@register_technique
class DpoTechnique(PairObjective):
    name = "dpo"
    Config = DpoConfig
    survey_section = "Fine-tuning objective (preference pairs; beyond the survey)"
    paper = "Rafailov et al. 2023 (arXiv 2305.18290)"
    objective = "preference"

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.reference_seconds: float | None = None
        self.reference_pairs = [0, 0]  # pairs scored by the reference pass: in all, by this process
        c = self.config
        self.beta = c.beta if c.beta is not None else BETA.get(c.loss_type, 0.1)
        self.reference = c.loss_type not in REFERENCE_FREE

    def validate(self, recipe, env) -> None:
        c = self.config
        if recipe.model.task not in ("auto", "preference"):
            raise RecipeError(
                "model.task", f"dpo trains on preference pairs (model.task preference), not {recipe.model.task}"
            )
        if c.label_smoothing and c.loss_type not in ("sigmoid", "simpo"):
            raise RecipeError("label_smoothing", f"applies to loss_type sigmoid or simpo, not {c.loss_type}")
        if c.simpo_gamma != DpoConfig.model_fields["simpo_gamma"].default and c.loss_type != "simpo":
            raise RecipeError("simpo_gamma", f"applies to loss_type simpo, not {c.loss_type}")
        stage = ((env.deepspeed_config or {}).get("zero_optimization") or {}).get("stage")
        if self.reference and (env.distributed_type == "FSDP" or stage == 3):
            raise RecipeError(
                "",
                "dpo's reference pass runs the whole model before training, which ZeRO-3 and FSDP shard; use DDP or "
                "ZeRO-1/2 (with LoRA or QLoRA the model is small), or a reference-free loss_type (simpo, orpo)",
            )

    def on_trainer(self, trainer) -> None:
        super().on_trainer(trainer)
        model = trainer.model
        if not self.reference or next(model.parameters()).is_meta:  # meta: hf-efftrain validate, no weights
            return
        device = trainer.args.device
        if next(model.parameters()).device != device and not getattr(model, "hf_device_map", None):
            model.to(device)  # under DeepSpeed the Trainer leaves the model where it loaded until the engine starts
        size = self.config.reference_batch_size or trainer.args.per_device_eval_batch_size
        start = time.perf_counter()
        for attr in ("train_dataset", "eval_dataset"):
            dataset = getattr(trainer, attr)
            if dataset is None:
                continue
            if REF in dataset.column_names:
                dataset = dataset.remove_columns(REF)
            logps = reference_logps(model, dataset, trainer.data_collator, size, trainer.accelerator)
            lo, hi = process_share(len(dataset), trainer.accelerator.process_index, trainer.accelerator.num_processes)
            self.reference_pairs = [self.reference_pairs[0] + len(logps), self.reference_pairs[1] + hi - lo]
            setattr(trainer, attr, dataset.add_column(REF, logps))
        self.reference_seconds = time.perf_counter() - start
        logger.info(
            "dpo: reference log-probs of %d pairs (%d on this process) in %.1fs", *self.reference_pairs,
            self.reference_seconds,
        )  # fmt: skip

    def loss(self, model, batch, compute_loss):
        if self.reference and REF not in batch:
            raise RecipeError(
                "techniques", "dpo: a batch without reference log-probs (the reference pass did not run)"
            )
        c = self.config
        total, count = pair_logps(model, batch, mean=False)
        reference = batch[REF].to(total.device) if self.reference else None
        per_token = count.clamp(min=1) if c.loss_type in MEAN else 1
        policy = total / per_token
        scored = None if reference is None else reference / per_token
        per_pair, rewards = dpo_loss(policy, scored, self.beta, c.loss_type, c.label_smoothing, c.simpo_gamma)
        loss, extra, logged = per_pair.mean(), {}, policy
        if self.reference:  # TRL logs DPO's rewards and log-probs on the sums, whatever the loss (ipo: means)
            rewards, logged = self.beta * (total - reference).detach(), total
        if c.loss_type == "orpo":  # the SFT term, eqs. 1 and 6: -log P(y_w|x), the chosen response's token mean
            nll = -policy[:, 0]
            loss = (nll + per_pair).mean()
            # TRL's names: log_odds_ratio is log sigmoid of the log odds ratio
            extra = {"nll_loss": nll.detach(), "log_odds_ratio": -per_pair.detach() / self.beta}
        logps = logged.detach()
        self.logged.add(
            "train" if model.training else "eval",
            {
                "rewards/chosen": rewards[:, 0],
                "rewards/rejected": rewards[:, 1],
                "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float(),
                "rewards/margins": rewards[:, 0] - rewards[:, 1],
                "logps/chosen": logps[:, 0],
                "logps/rejected": logps[:, 1],
                **extra,
            },
        )
        return loss

    def report(self) -> dict[str, Any]:
        return {
            "loss_type": self.config.loss_type,
            "beta": self.beta,
            "reference": (
                "the model as loaded (adapters disabled), precomputed" if self.reference else "none (reference-free)"
            ),
            "reference_pass_seconds": (None if self.reference_seconds is None else round(self.reference_seconds, 2)),
            "reference_pairs": self.reference_pairs[0],
            "reference_pairs_per_process": self.reference_pairs[1],
        }
