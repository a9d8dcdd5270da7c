"""Parameter-efficient and quantized fine-tuning benchmark (issue 5): full fine-tune vs LoRA vs 8-bit base + LoRA.

    OMP_NUM_THREADS=1 python benchmarks/peft_quant.py [--quick] [--steps 40] [--out benchmarks/results/peft_quant]

Built-in models are randomly initialised, and LoRA on a random base measures little, so a base is first
"pretrained" on builtin:stdlib-docs with the stock Trainer and saved with ``save_pretrained``; every variant then
fine-tunes that same local folder (the from_pretrained path) on builtin:sft-synthetic with the same batch, lr,
schedule and seed:

- ``full fine-tune (plain Trainer)``: ``Built.plain_trainer()``, the stock ``transformers.Trainer``, all weights.
- ``lora``: ``peft`` (r 8, alpha 16, all-linear) through EffTrainer.
- ``8-bit base + lora``: ``quantized_base`` (bits 8, LLM.int8()) + the same LoRA.
- ``4-bit nf4 base + lora`` (not in --quick): ``quantized_base`` (bits 4, NF4, double quantization) + LoRA.

Each variant runs in its own process; its peak RSS is reset after data preparation (``/proc/self/clear_refs``) so
"peak - start" is what training itself added (weights were loaded before). Measured: trainable parameters, model
weight bytes (``get_memory_footprint``, adapters included), optimizer-state bytes, RSS, median step time after a
warm-up, and the train loss after the same number of steps (mean of the last 5 logged). Writes results.{md,json}.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from core_overhead import StepTimer  # the sibling benchmark (a script's folder is on sys.path)

from hf_efftrain import Recipe
from hf_efftrain.build import build
from hf_efftrain.metrics import optimizer_state_bytes

logger = logging.getLogger("benchmarks.peft_quant")

LR = 1e-3
# Wider than the built-in default (hidden 128), so weights, gradients and optimizer state, not the activations of a
# few hundred tokens, dominate the training memory.
MODEL_OVERRIDES = {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8, "num_key_value_heads": 4}
BATCH, MAX_LENGTH = 4, 64
LORA = {"name": "peft", "method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "full fine-tune (plain Trainer)": [],
    "lora": [LORA],
    "8-bit base + lora": [{"name": "quantized_base", "bits": 8}, LORA],
    "4-bit nf4 base + lora": [{"name": "quantized_base", "bits": 4}, LORA],
}
BASELINE = "full fine-tune (plain Trainer)"
QUICK_VARIANTS = (BASELINE, "lora", "8-bit base + lora")


def recipe(
    model: str, data: str, steps: int, out: Path, techniques: list[dict[str, Any]], overrides: dict | None = None
) -> Recipe:
    return Recipe.parse(
        {
            "model": {"name_or_path": model, "config_overrides": overrides or {}},
            "data": {"train": data, "max_length": MAX_LENGTH},
            "training": {
                "output_dir": str(out),
                "max_steps": steps,
                "per_device_train_batch_size": BATCH,
                "learning_rate": LR,
                "lr_scheduler_type": "constant",
                "logging_steps": 1,
                "seed": 0,
                "disable_tqdm": True,
                "dataloader_pin_memory": False,
            },
            "techniques": techniques,
        }
    )


def pretrain_base(folder: Path, steps: int) -> None:
    built = build(recipe("builtin:tiny-llama", "builtin:stdlib-docs", steps, folder / "run", [], MODEL_OVERRIDES))
    built.plain_trainer().train()
    built.model.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux >= 4.0: ``5 > /proc/self/clear_refs``); return the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        logger.warning("cannot reset the peak RSS here; peak_rss includes data preparation")
    return _status_bytes("VmRSS")


def run_variant(name: str, base: Path, steps: int, warmup: int, out: Path) -> dict[str, Any]:
    """One variant in this process (called in a child process by ``main``)."""
    built = build(recipe(str(base), "builtin:sft-synthetic", steps, out, VARIANTS[name]))
    trainer = built.plain_trainer() if name == BASELINE else built.trainer
    timer = StepTimer()
    trainer.add_callback(timer)
    gc.collect()
    rss_before = _reset_peak_rss()  # the peak of data preparation is the same for all; measure training's own
    trainer.train()
    model = built.model
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "weight_bytes": int(base_model.get_memory_footprint()),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "rss_before_train_bytes": rss_before,
        "peak_rss_bytes": _status_bytes("VmHWM"),
        "peak_rss_over_start_bytes": _status_bytes("VmHWM") - rss_before,
        "step_time_s": statistics.median(timer.times[warmup:]),
        "loss_first": losses[0],
        "loss_end": statistics.fmean(losses[-5:]),
        "loss_curve": losses,
    }


def child(name: str, base: Path, steps: int, warmup: int, tmp: Path) -> dict[str, Any]:
    result = tmp / f"{name.replace(' ', '_')}.json"
    cmd = [sys.executable, __file__, "--variant", name, "--base", str(base), "--steps", str(steps)]
    cmd += ["--warmup", str(warmup), "--result", str(result)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 10 steps, 3 variants, short pretraining")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/peft_quant"))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child-process mode
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.variant:
        out = a.result.parent / a.result.stem
        a.result.write_text(json.dumps(run_variant(a.variant, a.base, a.steps, a.warmup, out)))
        return

    steps, pretrain = (10, 30) if a.quick else (a.steps, a.pretrain_steps)
    warmup = 3
    names = QUICK_VARIANTS if a.quick else tuple(VARIANTS)
    tmp = Path(tempfile.mkdtemp(prefix="bench_peft_quant_"))  # trainers' output dirs: nothing there is kept
    logger.info("pretraining the base for %d steps", pretrain)
    pretrain_base(tmp / "base", pretrain)
    load_start = os.getloadavg()[0]
    summary = {}
    for name in names:
        logger.info("variant: %s", name)
        summary[name] = child(name, tmp / "base", steps, warmup, tmp)
    base = summary[BASELINE]
    for s in summary.values():
        keys = (
            "params_trainable",
            "weight_bytes",
            "optimizer_state_bytes",
            "peak_rss_over_start_bytes",
            "step_time_s",
        )
        for key in keys:
            s[f"{key}_vs_full"] = s[key] / base[key] if base[key] else None

    a.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "quick": a.quick,
        "steps": steps,
        "pretrain_steps": pretrain,
        "warmup_steps_excluded": warmup,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_1min": [round(load_start, 1), round(os.getloadavg()[0], 1)],  # at start and end of variants
    }
    (a.out / "results.json").write_text(json.dumps({**meta, "summary": summary}, indent=2))
    lines = [
        f"PEFT / quantized-base benchmark{' (QUICK smoke run)' if a.quick else ''}: llama, 4 layers, "
        f"{', '.join(f'{k} {v}' for k, v in MODEL_OVERRIDES.items())}, pretrained {pretrain} steps on stdlib-docs and "
        f"saved, then fine-tuned from that folder on sft-synthetic, batch {BATCH} x <={MAX_LENGTH} tokens, "
        f"constant lr {LR:g}, AdamW, {steps} steps, seed 0; step time = median after "
        f"{warmup} warm-up steps; loss = mean of the last 5 steps. Each variant in its own process "
        f"(OMP_NUM_THREADS={meta['omp_num_threads']}) on {meta['cpu_count']} CPUs; 1-min load average "
        f"{meta['load_average_1min'][0]} at the first variant, {meta['load_average_1min'][1]} after the last.",
        "",
        "| variant | trainable params | vs full | model weight bytes | vs full | optimizer state (bytes) | vs full "
        "| RSS at start / peak in training (MB) | peak - start (MB) | vs full | step time (ms) | vs full "
        "| loss first -> end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['params_trainable']:,} | {s['params_trainable_vs_full']:.4f} | {s['weight_bytes']:,} "
            f"| {s['weight_bytes_vs_full']:.3f} | {s['optimizer_state_bytes']:,} "
            f"| {s['optimizer_state_bytes_vs_full']:.4f} "
            f"| {s['rss_before_train_bytes'] / 2**20:.0f} / {s['peak_rss_bytes'] / 2**20:.0f} "
            f"| {s['peak_rss_over_start_bytes'] / 2**20:.1f} | {s['peak_rss_over_start_bytes_vs_full']:.3f} "
            f"| {1e3 * s['step_time_s']:.1f} | {s['step_time_s_vs_full']:.2f}x "
            f"| {s['loss_first']:.3f} -> {s['loss_end']:.3f} |"
        )
    lines += [
        "",
        "- Trainable parameters and optimizer state scale together: AdamW keeps two fp32 moments per trainable "
        "parameter, so LoRA's state is the trainable-parameter ratio of the full fine-tune's.",
        "- Model weight bytes include the LoRA adapters; the 8-bit/4-bit bases quantize the block Linear layers only "
        "(transformers keeps the embedding and output head in fp32), so the whole-model ratio is above 1/4 or 1/8.",
        "- RSS: 'start' is after loading and data preparation, 'peak' the highest RSS during training; a quantized "
        "base is loaded in fp32 and then quantized, and memory the allocator keeps from that load shows up in its "
        "'start'. On a model this small the Python/torch process itself (~500 MB) dominates RSS.",
        "- Same lr for every variant (not tuned): LoRA usually wants a larger lr than full fine-tuning, so the loss "
        "column compares these exact settings, not the methods' best. Step times on CPU: bitsandbytes' CPU int8/NF4 "
        "kernels, not GPU ones; the machine was shared with other jobs, read the ratios with care.",
    ]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
