"""Data/token benchmark (issue 4): real tokens per second and loss at equal wall time, against the plain Trainer.

    python benchmarks/data_tokens.py [--quick] [--budget-s 30] [--out benchmarks/results/data_tokens]

Same model (builtin tiny-llama), data (stdlib-docs: 11..2272 tokens per document, truncated at ``max_length``),
batch, seed and constant learning rate for every row. The baseline row is the stock ``transformers.Trainer`` with
the stock collator (``DataCollatorForSeq2Seq``, which pads each batch to its longest row). Every other row is
``EffTrainer`` with techniques from a recipe. Each variant trains for the same wall-clock budget, timed from the end
of its first step (which carries one-time set-up costs). Then all variants are evaluated the same way: the
token-weighted cross-entropy on the held-out split, padded, at full length.

Measured from a forward pre-hook on the model, so the counting is the same for every variant:
- real tokens: ``attention_mask.sum()`` if the batch has a 2D mask, else ``input_ids != pad``;
- padding fraction: ``1 - real / input_ids.numel()``;
- real tokens/s: real tokens over the summed step times (data loading included), without the first step.

To add a row, append a ``Variant`` to ``VARIANTS``. Its ``techniques`` receives the ``Settings``, so it can size a
schedule to the run. Writes ``results.{md,json}``, ``loss_vs_time.png`` and ``tokens_per_second.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, TrainerCallback

from hf_efftrain import Recipe
from hf_efftrain.build import build

logger = logging.getLogger("benchmarks.data_tokens")


@dataclass(frozen=True)
class Settings:
    budget_s: float  # training wall time per variant, after the first step
    max_length: int = 512
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps_timing: int = 1  # steps left out of tokens/s (the first one carries one-time set-up)
    slw_steps: int = 40  # sequence-length warmup duration in optimizer steps
    max_train_samples: int | None = None
    max_eval_samples: int = 80


@dataclass(frozen=True)
class Variant:
    name: str
    techniques: Callable[[Settings], list[dict[str, Any]]] = field(default=lambda s: [])
    plain_trainer: bool = False  # the stock transformers.Trainer and collator, no hf_efftrain code in the loop
    note: str = ""


BASELINE = "padding (plain Trainer)"
VARIANTS: list[Variant] = [
    Variant(
        BASELINE,
        plain_trainer=True,
        note="stock Trainer + DataCollatorForSeq2Seq: each batch padded to its longest row",
    ),
    Variant(
        "packing",
        lambda s: [{"name": "packing"}],
        note="best-fit decreasing into rows of max_length, no attention across documents",
    ),
    Variant(
        "seqlen_warmup",
        lambda s: [{"name": "seqlen_warmup", "min_length": 64, "warmup_steps": s.slw_steps}],
        note="truncate to 64 -> max_length over slw_steps (linear, multiples of 8)",
    ),
    Variant(
        "seqlen_warmup (constant tokens)",
        lambda s: [{"name": "seqlen_warmup", "min_length": 64, "warmup_steps": s.slw_steps, "constant_tokens": True}],
        note="same schedule, rows reshaped into more shorter rows: real tokens per step kept",
    ),
    Variant(
        "packing + seqlen_warmup",
        lambda s: [{"name": "packing"}, {"name": "seqlen_warmup", "min_length": 64, "warmup_steps": s.slw_steps}],
        note="both",
    ),
]


def recipe(s: Settings, out: Path, techniques: list[dict[str, Any]]) -> Recipe:
    data: dict[str, Any] = {"train": "builtin:stdlib-docs", "max_length": s.max_length}
    data["max_eval_samples"] = s.max_eval_samples
    if s.max_train_samples:
        data["max_train_samples"] = s.max_train_samples
    return Recipe.parse(
        {
            "model": {"name_or_path": "builtin:tiny-llama"},
            "data": data,
            "training": {
                "output_dir": str(out),
                "max_steps": 100_000,  # the wall-clock budget stops training
                "per_device_train_batch_size": s.batch_size,
                "learning_rate": s.lr,
                "lr_scheduler_type": "constant",
                "logging_steps": 1,
                "seed": 0,
                "disable_tqdm": True,
                "dataloader_pin_memory": False,
            },
            "techniques": techniques,
        }
    )


class Meter(TrainerCallback):
    """Step times, real and total tokens per step (from the model's forward inputs), and the wall-clock budget."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, budget_s: float):
        self.pad, self.budget = pad_token_id, budget_s
        self.steps: list[dict[str, float]] = []
        self._real = self._total = 0
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        real = mask.sum() if mask is not None and mask.dim() == 2 else (ids != self.pad).sum()
        self._real += int(real)
        self._total += ids.numel()

    def on_train_begin(self, args, state, control, **kw):
        self._start: float | None = None
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        # From the previous step's end: data loading, collation and batch transforms count too. The clock of the
        # budget starts after the first step, which carries one-time set-up costs (seconds on a busy CPU).
        now = time.perf_counter()
        self._start = self._start or now
        step = {"time_s": now - self._last, "elapsed_s": now - self._start, "real": self._real, "total": self._total}
        self.steps.append(step)
        self._last, self._real, self._total = now, 0, 0
        if now - self._start >= self.budget:
            control.should_training_stop = True

    def close(self) -> None:
        self._hook.remove()


@torch.no_grad()
def eval_loss(model: torch.nn.Module, dataset: Any, collator: Any, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over the (unpacked, untruncated) held-out rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        batch = collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    return total / count


def run_variant(v: Variant, s: Settings, out: Path) -> dict[str, Any]:
    built = build(recipe(s, out / v.name.replace(" ", "_"), [] if v.plain_trainer else v.techniques(s)))
    if v.plain_trainer:
        trainer = built.plain_trainer()
    else:
        trainer = built.trainer
    meter = Meter(built.model, built.tokenizer.pad_token_id, s.budget_s)
    trainer.add_callback(meter)
    trainer.train()
    meter.close()
    eval_collator = DataCollatorForSeq2Seq(built.tokenizer, label_pad_token_id=-100)
    timed = meter.steps[s.warmup_steps_timing :] or meter.steps
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    real, total = sum(m["real"] for m in meter.steps), sum(m["total"] for m in meter.steps)
    return {
        "trainer": type(trainer).__name__,
        "note": v.note,
        "steps": len(meter.steps),
        "train_time_s": meter.steps[-1]["elapsed_s"],
        "real_tokens": real,
        "padding_fraction": 1 - real / total,
        "real_tokens_per_s": sum(m["real"] for m in timed) / sum(m["time_s"] for m in timed),
        "step_time_s": sum(m["time_s"] for m in timed) / len(timed),
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "eval_loss": eval_loss(built.model, built.eval_dataset, eval_collator, s.batch_size),
        "curve": [[m["elapsed_s"], loss] for m, loss in zip(meter.steps, losses)],
        "techniques": [t["name"] for t in (built.recipe.to_dict()["techniques"])],
    }


def plots(results: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        t, loss = zip(*r["curve"])
        k = max(1, len(loss) // 20)  # moving average: per-batch losses are noisy
        smooth = [
            sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))
        ]
        ax.plot(t, smooth, label=name)
    ax.set(xlabel="wall time (s)", ylabel="train loss (moving average)", title="Loss at equal wall time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_time.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results)
    ax.barh(names, [results[n]["real_tokens_per_s"] for n in names])
    ax.set(xlabel="real (non-padding) tokens / s", title="Training throughput")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "tokens_per_second.png", dpi=120)
    plt.close(fig)


def table(results: dict[str, dict[str, Any]], s: Settings) -> list[str]:
    base = results[BASELINE]
    lines = [
        f"Data/token benchmark: tiny-llama (4 layers, hidden 128), stdlib-docs truncated at {s.max_length} tokens, "
        f"batch {s.batch_size}, constant lr {s.lr}, {s.budget_s:.0f} s of training per variant after its first step; "
        f"tokens/s without the first {s.warmup_steps_timing} step(s); eval loss on {s.max_eval_samples} held-out "
        f"documents (padded, full length) at the end of the budget; seqlen_warmup over {s.slw_steps} steps.",
        "",
        "| variant | trainer | steps | pad | real tok/s | vs padding | eval loss, equal time | train loss (last 10) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['trainer']} | {r['steps']} | {100 * r['padding_fraction']:.1f}% | "
            f"{r['real_tokens_per_s']:,.0f} | {r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x | "
            f"{r['eval_loss']:.4f} | {r['train_loss_last10']:.4f} |"
        )
    lines.append("")
    lines += [f"- {name}: {r['note']}" for name, r in results.items()]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 6 s per variant, 256 training documents")
    p.add_argument("--budget-s", type=float, default=30.0)
    p.add_argument("--slw-steps", type=int, default=40)
    p.add_argument("--only", nargs="*", help="variant names to run (the baseline always runs)")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/data_tokens (--quick: a temporary folder)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.quick:
        s = Settings(budget_s=6.0, slw_steps=6, max_train_samples=256, max_eval_samples=16)
    else:
        s = Settings(budget_s=a.budget_s, slw_steps=a.slw_steps)
    variants = [v for v in VARIANTS if v.name == BASELINE or not a.only or v.name in a.only]
    tmp = Path(tempfile.mkdtemp(prefix="data_tokens_"))  # trainers' output dirs: nothing there is kept
    out = a.out or (tmp / "results" if a.quick else Path("benchmarks/results/data_tokens"))
    results = {}
    for v in variants:
        logger.info("variant %s", v.name)
        results[v.name] = run_variant(v, s, tmp)
    base = results[BASELINE]
    summary = {
        "packing_real_tokens_per_s_over_padding": results["packing"]["real_tokens_per_s"] / base["real_tokens_per_s"]
        if "packing" in results
        else None,
        "eval_loss_minus_baseline": {n: r["eval_loss"] - base["eval_loss"] for n, r in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"settings": s.__dict__, "quick": a.quick, "results": results, "summary": summary}, indent=2)
    )
    lines = table(results, s)
    ratio = summary["packing_real_tokens_per_s_over_padding"]
    if ratio is not None:
        lines.append(f"\nPacking vs padding, real tokens/s: {ratio:.2f}x (target >= 1.5x)")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plots(results, out)
    print("\n".join(lines))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
