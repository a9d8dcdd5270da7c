"""``hf-efftrain plan``: arguments, the readable table and the ``--json`` dict of the memory planner (``plan.py``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from ..errors import RecipeError
from .estimate import GB, MOMENTS, ZERO_STAGE, cheapest_fit, estimate
from .inputs import OPTIMIZERS, STRATEGIES, ModelSpec, Setup, model_from_count, parse_count


# ------------------------------------------------------------------------------------------------------ output
def describe_setup(s: Setup) -> str:
    if s.precision == "fp32":
        precision = "fp32"
    elif s.pure_16bit or s.adapter:
        precision = f"{s.precision} weights and compute"
    elif s.strategy in ("zero1", "zero2", "zero3"):
        precision = f"{s.precision} (16-bit weights, fp32 master in the optimizer)"
    else:
        precision = f"{s.precision} autocast over fp32 weights"
    strategy = {"single": "", "ddp": " DDP", "fsdp": " FSDP (full shard)"}.get(s.strategy, f" ZeRO-{s.strategy[-1]}")
    offload = (
        " + offload " + ("optimizer & params" if s.offload_params else "optimizer") if s.offload_optimizer else ""
    )
    unit = "GPU" if s.device == "cuda" else "CPU process"
    parts = [
        f"seq {s.seq_len} x micro-batch {s.batch} (x{s.grad_accum} accumulation)",
        f"{s.num_gpus} {unit}{'s' if s.num_gpus > 1 else ''}{strategy}{offload}"
        + (f" x tensor parallel {s.tp} x pipeline {s.pp}" if s.tp * s.pp > 1 else ""),
        precision,
        f"{s.optimizer} {s.optimizer_bits}-bit",
        f"{s.attention} attention",
        "gradient checkpointing" if s.checkpointing else "no checkpointing",
    ]
    if s.adapter:
        parts.append(f"{s.adapter} r={s.lora_rank}")
    return ", ".join(parts)


def report(model: ModelSpec, s: Setup, budget: float | None) -> dict[str, Any]:
    """The machine-readable plan (``--json``)."""
    e = estimate(model, s)
    fits = e.fits(budget)
    return {
        "model": {
            "params": model.params,
            "trainable_params": e.trainable,
            "layers": model.layers,
            "hidden": model.shape.hidden,
            "heads": model.shape.heads,
            "vocab": model.vocab,
            "source": model.source,
        },
        "setup": asdict(s) | {"description": describe_setup(s)},
        "device_bytes": e.device,
        "host_bytes": e.host,
        "phases_bytes": e.phases,
        "peak_bytes": e.peak,
        "budget_bytes": None if budget is None else int(budget),
        "fits": fits,
        "suggestion": cheapest_fit(model, s, budget) if fits is False else None,
        "notes": e.notes,
        "units": "bytes; GB in the table = 1e9 bytes",
    }


def render(plan: dict[str, Any]) -> str:
    """The readable table of ``hf-efftrain plan``."""
    m = plan["model"]
    lines = [
        f"model: {m['params'] / 1e9:.3g}B parameters ({m['params']:,}), {m['trainable_params']:,} trainable; "
        f"{m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, vocab {m['vocab']}",
        f"       {m['source']}",
        f"setup: {plan['setup']['description']}",
        "",
        f"{'per device':<44}{'GB':>10}",
    ]
    lines += [f"  {name:<42}{value / GB:>10.3f}" for name, value in plan["device_bytes"].items()]
    ph = plan["phases_bytes"]
    lines += [
        f"  {'-' * 52}",
        f"  {'peak in forward/backward':<42}{ph['forward/backward'] / GB:>10.3f}",
        f"  {'peak in optimizer step':<42}{ph['optimizer step'] / GB:>10.3f}",
        f"  {'predicted peak':<42}{plan['peak_bytes'] / GB:>10.3f}",
    ]
    if plan["host_bytes"]:
        lines.append(f"{'offloaded to CPU memory (per process)':<44}")
        lines += [f"  {name:<42}{value / GB:>10.3f}" for name, value in plan["host_bytes"].items()]
    if plan["budget_bytes"] is None:
        lines.append("\nno memory budget: pass --gpu-memory-gb to check the fit")
    else:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"\nbudget {plan['budget_bytes'] / GB:g} GB per device: {verdict}")
    if plan["fits"] is False:
        sug = plan["suggestion"]
        if sug is None:
            lines.append("no change tried here makes it fit (up to 1024 GPUs with ZeRO-3, offload and QLoRA)")
        else:
            lines.append(f"cheapest change that fits: {' + '.join(sug['changes'])} -> predicted peak "
                         f"{sug['peak_bytes'] / GB:.3f} GB")  # fmt: skip
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML (or use --params)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. model.name_or_path=FOLDER_WITH_CONFIG_JSON")  # fmt: skip
    p.add_argument("--params", help="plan a model by parameter count instead, e.g. 7B, 1.3B, 125M")
    for name, kind, help_ in (
        ("--layers", int, "blocks (default: derived from --params)"),
        ("--hidden", int, "hidden size (default: derived from --params)"),
        ("--heads", int, "attention heads (default hidden/128)"),
        ("--kv-heads", int, "key/value heads for grouped-query attention (default: heads)"),
        ("--intermediate", int, "MLP size (default 8*hidden/3, SwiGLU)"),
        ("--vocab", int, "vocabulary (default 32000)"),
        ("--seq-len", int, "tokens per sequence (default 2048; recipe: data.max_length)"),
        ("--batch", int, "per-device micro-batch (default 1; recipe: per_device_train_batch_size)"),
        ("--grad-accum", int, "gradient accumulation steps (default 1)"),
        ("--lora-rank", int, "LoRA rank for --adapter (default 8)"),
    ):
        p.add_argument(name, type=kind, help=help_)
    p.add_argument("--num-gpus", type=int, help="data-parallel devices (default 1, or the accelerate config's)")
    p.add_argument("--gpu-memory-gb", type=float, help="memory per device in GB (1e9 bytes); default: this GPU's")
    p.add_argument("--accelerate-config", help="accelerate config YAML: DDP / DeepSpeed ZeRO stage / FSDP / offload")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="compute precision (default bf16)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default adamw")
    p.add_argument("--optimizer-bits", type=int, choices=(32, 8), help="8: bitsandbytes 8-bit states")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--attention", choices=("eager", "sdpa", "flash"), help="default sdpa")
    p.add_argument("--strategy", choices=STRATEGIES, help="default: single (ddp with --num-gpus > 1)")
    p.add_argument("--tp", type=int, help="tensor-parallel degree (default 1, or the accelerate config's tp_size)")
    p.add_argument("--pp", type=int, help="pipeline-parallel stages (default 1)")
    p.add_argument("--offload", choices=("none", "optimizer", "all"), help="ZeRO/FSDP CPU offload")
    p.add_argument("--adapter", choices=("lora", "qlora"), help="train LoRA adapters on a frozen base")
    p.add_argument("--device", choices=("cuda", "cpu"), help="what runs it (cpu: fp32 unless the recipe says bf16)")
    p.add_argument("--json", action="store_true", help="print a machine-readable dict")


def plan_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Parse the ``plan`` arguments into a model and a set-up; return ``report(...)``. User errors: RecipeError."""
    if (args.recipe is None) == (args.params is None):
        raise RecipeError("plan", "give a recipe YAML or --params COUNT (one of them)")
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "seq_len", "batch", "grad_accum",
                 "lora_rank", "num_gpus", "tp", "pp"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RecipeError(f"--{name.replace('_', '-')}", f"must be >= 1 (got {value})")
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        raise RecipeError("--gpu-memory-gb", f"must be > 0 (got {args.gpu_memory_gb})")
    device = args.device or "cuda"
    if args.params is not None:
        model = model_from_count(
            parse_count(args.params), layers=args.layers, hidden=args.hidden, heads=args.heads,
            kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab or 32000,
        )  # fmt: skip
        setup = Setup(seq_len=args.seq_len or 2048, batch=args.batch or 1, device=device)
    else:
        from ..core.recipe import load_recipe

        model, setup = recipe_model_and_setup(load_recipe(args.recipe, getattr(args, "overrides", None)), device)
        setup = setup.changed(seq_len=args.seq_len or setup.seq_len, batch=args.batch or setup.batch)
    if args.accelerate_config:
        from .inputs import distributed_from_accelerate

        setup = setup.changed(**distributed_from_accelerate(args.accelerate_config))
    overrides = {
        "grad_accum": args.grad_accum,
        "num_gpus": args.num_gpus,
        "tp": args.tp,
        "pp": args.pp,
        "precision": args.precision,
        "optimizer": args.optimizer,
        "optimizer_bits": args.optimizer_bits,
        "checkpointing": args.gradient_checkpointing,
        "attention": args.attention,
        "strategy": args.strategy,
        "adapter": args.adapter,
        "lora_rank": args.lora_rank,
    }
    setup = setup.changed(**{k: v for k, v in overrides.items() if v is not None})
    if args.offload is not None:
        setup = setup.changed(offload_optimizer=args.offload != "none", offload_params=args.offload == "all")
    if setup.strategy == "single" and setup.num_gpus > 1:
        setup = setup.changed(strategy="ddp")
    if setup.offload_optimizer and ZERO_STAGE[setup.strategy] == 0:
        raise RecipeError("--offload", "CPU offload needs ZeRO or FSDP: add --strategy zero2/zero3/fsdp")
    if setup.optimizer_bits == 8 and not MOMENTS[setup.optimizer]:
        raise RecipeError("--optimizer-bits", f"{setup.optimizer} keeps no state to quantize")
    budget = args.gpu_memory_gb * GB if args.gpu_memory_gb else _this_gpu_memory(device)
    return report(model, setup, budget)


def recipe_model_and_setup(recipe: Any, device: str, accelerate_config: str | None = None) -> tuple[ModelSpec, Setup]:
    """The planner's model and set-up for a recipe (and an ``accelerate launch`` config); no weights are loaded."""
    from ..core.build import infer_task, recipe_objective
    from ..core.model_loading import TASK_AUTO_CLASS
    from .inputs import distributed_from_accelerate, model_from_config, setup_from_recipe

    config, setup = setup_from_recipe(recipe, device)
    # No data is read here: a pair objective names its task (a reward model's class), else the model and recipe do.
    task = recipe_objective(recipe) or infer_task(recipe, config, [])
    if task == "reward":
        config.num_labels = 1  # as build.load_data sizes it
    model = model_from_config(config, TASK_AUTO_CLASS[task])
    if accelerate_config:
        setup = setup.changed(**distributed_from_accelerate(accelerate_config))
    return model, setup


def planned_process_bytes(recipe: Any, device: str, accelerate_config: str | None = None) -> int:
    """Predicted peak of one training process: device memory, plus what is offloaded to the host when the device is
    the CPU itself (then both live in the same process)."""
    est = estimate(*recipe_model_and_setup(recipe, device, accelerate_config))
    return est.peak + (sum(est.host.values()) if device == "cpu" else 0)


def _this_gpu_memory(device: str) -> float | None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return None
