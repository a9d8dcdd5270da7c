"""Precision and rematerialization benchmark (issue 5): fp32 vs bf16 AMP vs pure bf16 vs gradient checkpointing.

    OMP_NUM_THREADS=1 python benchmarks/precision_remat.py [--quick] [--steps 30] [--repeats 2]
        [--out benchmarks/results/precision_remat]

Same model (builtin tiny-llama with 8 layers), data (stdlib-docs, 256 tokens), batch, seed and constant lr for every
row. The baseline row is the stock ``transformers.Trainer`` (``Built.plain_trainer()``) in fp32; the others are
``EffTrainer`` with one technique: ``mixed_precision`` (bf16 autocast; pure bf16 with stochastic rounding, Kahan
summation or plain round-to-nearest updates) and ``gradient_checkpointing`` (every layer, every 2nd layer).

Each variant runs in its own Python process, so that its peak resident memory (``ru_maxrss``) is its own; the peak
during training is also sampled (psutil, every 5 ms) and given as growth over the RSS when training starts, which is
what the technique changes (the interpreter, torch and the data take the same few hundred MB in every row). Also
measured: bytes of parameters + optimizer state, median step time after a warm-up (variants interleaved, repeated),
and the loss after the same number of steps. Writes ``results.{md,json}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.precision_remat")

LR = 1e-3
LAYERS, SEQ_LEN, BATCH = 8, 256, 16
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "fp32 (plain Trainer)": [],
    "bf16 AMP": [{"name": "mixed_precision", "dtype": "bf16"}],
    "pure bf16, stochastic rounding": [{"name": "mixed_precision", "pure_bf16": True}],
    "pure bf16, Kahan summation": [{"name": "mixed_precision", "pure_bf16": True, "update_rounding": "kahan"}],
    "pure bf16, nearest (Trainer AdamW)": [
        {"name": "mixed_precision", "pure_bf16": True, "update_rounding": "nearest"}
    ],
    "checkpointing, every layer": [{"name": "gradient_checkpointing"}],
    "checkpointing, every 2nd layer": [{"name": "gradient_checkpointing", "every_n_layers": 2}],
}
BASELINE = "fp32 (plain Trainer)"


def recipe(steps: int, out: Path, techniques: list[dict[str, Any]]):
    from hf_efftrain import Recipe

    return Recipe.parse(
        {
            "model": {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": LAYERS}},
            "data": {"train": "builtin:stdlib-docs", "max_length": SEQ_LEN, "max_train_samples": 4096},
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


class RssSampler(threading.Thread):
    """Highest resident set size seen while running (sampled; ``ru_maxrss`` covers the whole process life)."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        super().__init__(daemon=True)
        self.process, self.interval_s = psutil.Process(), interval_s
        self.start_rss = self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 matmul features (AVX512-BF16, AMX), which decide whether bf16 is fast on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")})


def run_variant(name: str, steps: int, warmup: int, out: Path) -> dict[str, Any]:
    """One variant, in this process (the parent starts one process per variant and repeat)."""
    import gc

    import torch
    from core_overhead import StepTimer  # the sibling benchmark (a script's folder is on sys.path)

    from hf_efftrain.build import build
    from hf_efftrain.metrics import optimizer_state_bytes

    built = build(recipe(steps, out, VARIANTS[name]))
    trainer = built.plain_trainer() if name == BASELINE else built.trainer
    timer = StepTimer()
    trainer.add_callback(timer)
    gc.collect()
    sampler = RssSampler()
    sampler.start()
    trainer.train()
    peak = sampler.stop()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    model = trainer.model
    return {
        "technique_optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        "param_and_state_bytes": sum(p.numel() * p.element_size() for p in model.parameters())
        + optimizer_state_bytes(trainer.optimizer),
        "step_time_s": statistics.median(timer.times[warmup:]),
        "rss_at_train_start": sampler.start_rss,
        "rss_peak_in_training": peak,
        "rss_growth_in_training": peak - sampler.start_rss,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss_final": losses[-1],
        "loss_first": losses[0],
        "torch_threads": torch.get_num_threads(),
    }


def _child(a: argparse.Namespace) -> None:
    result = run_variant(a.child, a.steps, a.warmup, Path(a.tmp))
    Path(a.result).write_text(json.dumps(result))


def _spawn(name: str, steps: int, warmup: int, tmp: Path) -> dict[str, Any]:
    result = tmp / "result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(steps), "--warmup", str(warmup)]
    cmd += ["--tmp", str(tmp / "run"), "--result", str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 1 repeat")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/precision_remat"))
    p.add_argument("--from-json", action="store_true", help="only rebuild results.md from --out/results.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.child:
        logging.getLogger().setLevel(logging.WARNING)
        return _child(a)
    if a.from_json:
        return write_markdown(a.out, json.loads((a.out / "results.json").read_text()))
    steps, repeats = (6, 1) if a.quick else (a.steps, a.repeats)
    warmup = min(3, steps // 2)

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    tmp = Path(tempfile.mkdtemp(prefix="bench_precision_remat_"))  # trainers' output dirs: nothing there is kept
    for r in range(repeats):
        for v in VARIANTS:
            logger.info("repeat %d/%d: %s", r + 1, repeats, v)
            runs[v].append(_spawn(v, steps, warmup, tmp))

    summary: dict[str, dict[str, Any]] = {}
    for v, rs in runs.items():
        times = [r["step_time_s"] for r in rs]
        summary[v] = {
            **{k: rs[0][k] for k in ("technique_optimizer", "param_dtypes", "param_and_state_bytes", "loss_final")},
            "step_time_s": statistics.median(times),
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "rss_peak_in_training": statistics.median(r["rss_peak_in_training"] for r in rs),
            "rss_growth_in_training": statistics.median(r["rss_growth_in_training"] for r in rs),
            "ru_maxrss": statistics.median(r["ru_maxrss"] for r in rs),
            "same_loss_every_repeat": len({r["loss_final"] for r in rs}) == 1,
            "runs": rs,
        }
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "quick": a.quick,
        "steps": steps,
        "repeats": repeats,
        "warmup_steps_excluded": warmup,
        "model": f"builtin:tiny-llama, {LAYERS} layers",
        "batch": f"{BATCH} x {SEQ_LEN} tokens",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "cpu_count": os.cpu_count(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "load_average_at_end": os.getloadavg(),
    }
    (a.out / "results.json").write_text(json.dumps({**meta, "summary": summary}, indent=2))
    write_markdown(a.out, {**meta, "summary": summary})


def write_markdown(out: Path, results: dict[str, Any]) -> None:
    """results.md from the results.json content (``--from-json`` rebuilds it without rerunning)."""
    summary, mib = results["summary"], 1 << 20
    base = summary[BASELINE]
    steps, repeats, warmup = results["steps"], results["repeats"], results["warmup_steps_excluded"]
    lines = [
        f"Precision / rematerialization benchmark{' (QUICK smoke run)' if results['quick'] else ''}: tiny-llama "
        f"({LAYERS} layers, hidden 128), stdlib-docs, batch {BATCH} x up to {SEQ_LEN} tokens, constant lr {LR:g}, "
        f"{steps} steps, {repeats} interleaved repeat(s), one process per run, CPU (OMP_NUM_THREADS="
        f"{results['omp_num_threads']}); step time = median after {warmup} warm-up steps (min..max of repeats). "
        "Baseline: stock Trainer, fp32, torch AdamW.",
        "",
        "| variant | weights | optimizer | params + opt. state (MiB) | vs fp32 | RSS growth in training (MiB) "
        "| vs fp32 | peak RSS (MiB) | step time (ms) | vs fp32 | loss @ end |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, s in summary.items():
        lines.append(
            f"| {v} | {'/'.join(s['param_dtypes'])} | {s['technique_optimizer']} "
            f"| {s['param_and_state_bytes'] / mib:.1f} "
            f"| {s['param_and_state_bytes'] / base['param_and_state_bytes']:.3f} "
            f"| {s['rss_growth_in_training'] / mib:.0f} "
            f"| {s['rss_growth_in_training'] / base['rss_growth_in_training']:.2f} "
            f"| {s['rss_peak_in_training'] / mib:.0f} "
            f"| {1e3 * s['step_time_s']:.0f} ({1e3 * s['step_time_min_s']:.0f}..{1e3 * s['step_time_max_s']:.0f}) "
            f"| {s['step_time_s'] / base['step_time_s']:.2f}x | {s['loss_final']:.4f} |"
        )
    spread = max(s["step_time_max_s"] / s["step_time_min_s"] for s in summary.values())
    timing = (
        f"One variant's step time differs by up to {spread:.1f}x between repeats: the machine was loaded by other "
        "jobs, so the step-time columns say nothing about speed here (memory and loss do not depend on load)."
        if spread > 1.25
        else "Step times are noisy on a shared machine: read the ratios."
    )
    lines += [
        "",
        "RSS growth = highest sampled RSS during `trainer.train()` minus the RSS when it starts (weights, gradients, "
        "optimizer state and the largest step's activations, plus allocator slack). CPU bf16 matmul features: "
        f"{', '.join(results['cpu_bf16_flags']) or 'none'}; load average at the end: "
        + ", ".join(f"{x:.1f}" for x in results["load_average_at_end"])
        + f" on {results['cpu_count']} cores. {timing}",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
