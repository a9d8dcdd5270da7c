"""Run ``hf_efftrain.core.run.train(recipe)`` under ``accelerate launch`` and record what each process saw.

Usage (from the repository root): ``accelerate launch --config_file accelerate_configs/X.yaml
tests/e2e/distributed_probe.py RECIPE OUT_DIR``. The run is the real CLI path (``train()`` builds, trains, writes
run_report.json); the probe only observes it, through ``build()``'s result: a forward pre-hook records a hash of
every training row the model is given (non-padding tokens), and the weights are digested before and after training
(gathered from their ZeRO-3 shards first). Each rank writes ``OUT_DIR/probe_rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch


def row_hash(ids: Any) -> str:
    return hashlib.sha1(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> dict[str, Any]:
    """sha256 of every parameter (name order, float32 bytes), their count and sum; gathers ZeRO-3 shards."""
    params = list(model.named_parameters())

    def digest() -> dict[str, Any]:
        h = hashlib.sha256()
        numel, total = 0, 0.0
        for name, p in params:
            t = p.detach().float().cpu().contiguous()
            h.update(name.encode())
            h.update(t.numpy().tobytes())
            numel += t.numel()
            total += float(t.double().sum())
        return {"sha256": h.hexdigest(), "numel": numel, "sum": total}

    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return digest()
    return digest()


def optimizer_chain(optimizer: Any) -> list[str]:
    """Class names from the Trainer's optimizer down its ``.optimizer`` wrappers (Accelerate, DeepSpeed ZeRO)."""
    names = []
    while optimizer is not None and len(names) < 5:
        names.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return names


def main(recipe_path: str, out_dir: str) -> None:
    import hf_efftrain.core.run as run

    probe: dict[str, Any] = {"rows": []}
    captured: dict[str, Any] = {}
    real_build = run.build

    def observed_build(recipe, *args, **kwargs):
        built = real_build(recipe, *args, **kwargs)
        captured["built"] = built

        def record(module, args, kwargs):
            if module.training:
                ids = kwargs.get("input_ids", args[0] if args else None)
                mask = kwargs.get("attention_mask")
                for i, row in enumerate(ids):
                    keep = row if mask is None else row[mask[i].bool()]
                    probe["rows"].append(row_hash(keep))

        built.model.register_forward_pre_hook(record, with_kwargs=True)
        probe["weights_before"] = weights_digest(built.model)
        return built

    run.build = observed_build
    report = run.train(recipe_path)
    built = captured["built"]
    trainer = built.trainer
    rank = trainer.args.process_index
    probe.update(
        rank=rank,
        world_size=trainer.args.world_size,
        distributed_type=report["distributed_type"],
        optimizers=optimizer_chain(trainer.optimizer),
        deepspeed_config=getattr(trainer.accelerator, "deepspeed_config", None),
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        param_dtype=str(next(built.model.parameters()).dtype),
        weights_after=weights_digest(built.model),
        report={
            k: report[k] for k in ("world_size", "distributed_type", "optimizer_state_bytes", "peak_memory_bytes")
        },
    )
    if rank == 0:
        probe["dataset_rows"] = [row_hash(r) for r in built.train_dataset["input_ids"]]
    path = Path(out_dir) / f"probe_rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(probe, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
