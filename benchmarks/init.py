"""Initialization benchmark (issue 3): a deep, narrow post-LN BERT stack (``BertLMHeadModel``, ``is_decoder``) trained
as a causal LM at a high learning rate with no warmup. The stock ``transformers.Trainer`` with the model's default init
next to ``t_fixup``, ``deepnorm`` and ``fixup`` (EffTrainer), on the same model config, data and seed, in one run; plus
a control: the stock Trainer on a shallow (6-layer) copy, which trains, so the stall of the deep one is due to depth.

Data: the built-in stdlib docs, tokenized whole (``<bos> doc <eos>``), concatenated and cut into ``--seq-len`` chunks,
the usual causal-LM pretraining layout (no padding, document boundaries at random positions).

    python benchmarks/init.py [--quick] [--steps 200] [--layers 24] [--lr 2e-3] [--out benchmarks/results/init]

Writes ``results.json``, ``results.md`` and ``loss.png`` (loss curves side by side) under ``--out``. ``--quick`` is
a smoke run (few steps, shallower model) written under ``<out>/quick``. The Trainer's defaults stay on (AdamW,
gradient clipping at 1.0); only the schedule is constant, without warmup.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import textwrap
import time
from pathlib import Path

import datasets
import torch
from transformers import Trainer

from hf_efftrain import Recipe
from hf_efftrain.build import build
from hf_efftrain.trainer import EffTrainer

VARIANTS = {
    "plain_trainer": [],  # stock Trainer, the model's default init, post-LN with LayerNorm, no warmup
    "t_fixup": [{"name": "t_fixup"}],
    "deepnorm": [{"name": "deepnorm"}],
    "fixup": [{"name": "fixup"}],
    "plain_trainer_6_layers": [],  # control: the same, but shallow
}
CONTROL_LAYERS = 6


def recipe(a: argparse.Namespace, out: Path, techniques: list[dict], layers: int) -> Recipe:
    return Recipe.parse(
        {
            "model": {
                "name_or_path": "builtin:tiny-bert",
                "task": "causal_lm",
                "config_overrides": {
                    "is_decoder": True,  # BertLMHeadModel: causal self-attention, post-LN
                    "hidden_size": a.hidden,
                    "num_hidden_layers": layers,
                    "num_attention_heads": 4,
                    "intermediate_size": 4 * a.hidden,
                    "max_position_embeddings": a.seq_len,
                    "hidden_dropout_prob": 0.0,
                    "attention_probs_dropout_prob": 0.0,
                },
            },
            "data": {"train": "builtin:stdlib-docs", "max_length": 4096},  # whole documents; chunked below
            "training": {
                "output_dir": str(out),
                "max_steps": a.steps,
                "per_device_train_batch_size": a.batch,
                "learning_rate": a.lr,
                "lr_scheduler_type": "constant",
                "warmup_steps": 0,
                "logging_steps": 1,
                "logging_nan_inf_filter": False,  # a diverged run must show NaN, not a filtered mean
                "seed": 0,
                "disable_tqdm": True,
                "dataloader_pin_memory": False,
            },
            "techniques": techniques,
        }
    )


def chunks(tokenized: datasets.Dataset, seq_len: int) -> datasets.Dataset:
    """Concatenate the tokenized documents and cut the stream into full ``seq_len`` rows."""
    stream = [t for ids in tokenized["input_ids"] for t in ids]
    rows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * seq_len] * len(rows), "labels": rows}
    )


def run_variant(name: str, a: argparse.Namespace, out: Path) -> dict:
    layers = CONTROL_LAYERS if name == "plain_trainer_6_layers" else a.layers
    built = build(recipe(a, out / name, VARIANTS[name], layers))  # techniques' on_model ran here
    common = {
        "model": built.model,
        "args": built.args,
        "train_dataset": chunks(built.train_dataset, a.seq_len),
        "data_collator": built.collator,
        "processing_class": built.tokenizer,
    }
    if name.startswith("plain_trainer"):  # the stock Trainer; only data preparation is shared
        trainer = Trainer(**common)
    else:
        trainer = EffTrainer(**common, techniques=built.techniques)
    start = time.perf_counter()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tail = losses[-max(1, len(losses) // 10) :]  # mean of the last 10%: less noisy than the last step
    finite = [x for x in tail if math.isfinite(x)]
    grad_norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    return {
        "trainer": type(trainer).__name__,
        "layers": layers,
        "loss_first": losses[0],
        "loss_final": sum(finite) / len(finite) if finite else float("nan"),
        "loss_min": min((x for x in losses if math.isfinite(x)), default=float("nan")),
        "diverged": not all(math.isfinite(x) for x in losses + grad_norms),
        "wall_s": time.perf_counter() - start,
        "loss_curve": losses,
    }


def plot(runs: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in runs.items():
        style = "--" if name == "plain_trainer_6_layers" else "-"  # the shallow control
        ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], style, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("causal-LM training loss")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 8 layers, 15 steps")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/init"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.steps, a.layers, a.out = 15, 8, a.out / "quick"
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="init_bench_"))  # trainers' output dirs: nothing there is kept
    runs = {name: run_variant(name, a, tmp) for name in a.variants}

    setting = (
        f"post-LN BERT causal LM, {a.layers} layers (control: {CONTROL_LAYERS}), hidden {a.hidden}, stdlib-docs "
        f"chunked, batch {a.batch} x {a.seq_len} tokens, AdamW lr {a.lr:g} constant, no warmup, grad clipping 1.0, "
        f"no dropout, {a.steps} steps, seed 0"
    )
    a.out.mkdir(parents=True, exist_ok=True)
    plot(runs, a.out / "loss.png", setting)
    summary = {n: {k: v for k, v in r.items() if k != "loss_curve"} for n, r in runs.items()}
    (a.out / "results.json").write_text(
        json.dumps({"setting": setting, "args": {k: str(v) for k, v in vars(a).items()}, "runs": runs}, indent=2)
    )
    lines = [
        setting + ".",
        "",
        "| variant | trainer | layers | loss @ step 1 | final loss (last 10%) | best loss | diverged | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['trainer']} | {s['layers']} | {s['loss_first']:.3f} | {s['loss_final']:.3f} | "
            f"{s['loss_min']:.3f} | {s['diverged']} | {s['wall_s']:.1f} |"
        )
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
