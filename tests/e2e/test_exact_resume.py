"""Exact resume: for every technique that keeps state, N steps straight and K steps + resume to N give the same
losses and gradient norms step by step, bitwise on CPU fp32 (every op here is deterministic on the CPU).

The straight run saves ``checkpoint-K`` (``save_steps: K``); the resumed run starts in a fresh output folder from
that checkpoint, through ``EffTrainer.train(resume_from_checkpoint=...)`` (which loads the techniques'
``efftrain_state.pt``) or, under DDP, through the CLI with ``training.resume_from_checkpoint``. Each config is
chosen so the technique's state changes between K and N (a schedule still moving, RigL updates and magnitude
pruning after K, a stacking growth after K, generators that advance every step, a loss history that fills).
``test_dropping_technique_state_breaks_resume`` proves it: resumed without the technique state, those runs differ.

Under DDP only process 0 writes ``efftrain_state.pt``, so a technique's state must be the same on every process:
token_dropping's importance table and selective_backprop's loss history and generator are kept global (reduced over
processes); before that, the resumed second process took the first one's state and the losses differed after K.
No case needs a tolerance: every comparison is bitwise (CPU fp32, one thread per process, gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_efftrain import Recipe
from hf_efftrain.core.build import build

ROOT = Path(__file__).resolve().parents[2]
N, K = 8, 4

LLAMA = {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 2}}
LLAMA4 = {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 4}}
BERT = {"name_or_path": "builtin:tiny-bert", "config_overrides": {"num_hidden_layers": 3}}
T5 = {"name_or_path": "builtin:tiny-t5"}

# case -> (model, data overrides, techniques, technique state matters between K and N)
CASES: dict[str, tuple[dict, dict, list[dict], bool]] = {
    "plain": (LLAMA, {}, [], False),
    # keep grows 0.25 -> 1 over the run; the drop generator advances at every dropping layer of every step
    "token_dropping/random": (
        LLAMA4,
        {},
        [{"name": "token_dropping", "keep_start": 0.25, "multiple_of": 4}],
        True,
    ),
    # Hou et al.: per-token-id loss EMA (beta 0.5: moves fast) + token_masking's batch counter (mlm)
    "token_dropping/importance+token_masking": (
        BERT,
        {},
        [
            {"name": "token_dropping", "strategy": "importance", "keep_start": 0.25, "multiple_of": 4},
            {"name": "token_masking"},
        ],
        True,
    ),
    # T5 span corruption on 64-token text rows (several spans per row: the counter-seeded draws matter)
    "token_masking/span": (
        T5,
        {"max_length": 64},
        [{"name": "token_masking", "mode": "span", "mask_rate": 0.3}],
        True,
    ),
    # pruned set rebuilt in the resumed run's fresh folder: proxy training and selection must repeat exactly
    "data_pruning/el2n": (
        LLAMA,
        {},
        [{"name": "data_pruning", "score": "el2n", "keep_fraction": 0.5, "proxy_steps": 2, "strategy": "random"}],
        False,
    ),
    # length still growing after K (8 -> 32 over 6 steps), rows reshaped to keep tokens per step constant
    "seqlen_warmup": (
        LLAMA,
        {},
        [{"name": "seqlen_warmup", "min_length": 8, "warmup_steps": 6, "constant_tokens": True}],
        False,
    ),
    # masks pruned at steps 2, 4, 6, 7 (cubic schedule)
    "sparse_training/magnitude": (
        LLAMA,
        {},
        [{"name": "sparse_training", "start_step": 2, "end_step": 7, "update_every": 2}],
        False,
    ),
    # random initial mask, drop/grow at steps 3 and 6 (zeroed optimizer state of grown weights)
    "sparse_training/rigl": (
        LLAMA,
        {},
        [{"name": "sparse_training", "method": "rigl", "end_step": 8, "update_every": 3}],
        False,
    ),
    # 1 -> 2 layers after step 2, 2 -> 4 after step 6: resumed in stage 2, grows again after K
    "progressive_stacking": (
        LLAMA4,
        {},
        [{"name": "progressive_stacking", "start_layers": 1, "grow_at_steps": [2, 6]}],
        True,
    ),
    # theta(t) falls fast (gamma 0.2): drop decisions keyed by (seed, step, forward)
    "layer_dropping": (LLAMA4, {}, [{"name": "layer_dropping", "gamma": 0.2}], False),
    # 0 -> 3 of 4 blocks frozen over steps 2..6
    "layer_freezing": (
        LLAMA4,
        {},
        [{"name": "layer_freezing", "start_step": 2, "end_step": 6, "final_fraction": 0.75}],
        False,
    ),
    # selection from step 2 on, over a 16-loss history and a generator that both carry across K
    "selective_backprop": (
        LLAMA,
        {},
        [{"name": "selective_backprop", "beta": 1.0, "start_step": 2, "history_size": 16}],
        True,
    ),
    # 2 micro-batches per step (the resumed dataloader skips K steps' worth), lr scaled x2
    "large_batch": (
        LLAMA,
        {},
        [{"name": "large_batch", "batch_size": 8, "lr_scaling": "linear", "reference_batch_size": 4}],
        False,
    ),
    "packing": (LLAMA, {}, [{"name": "packing"}], False),
}


def recipe_dict(out: Path, case: str) -> dict:
    model, data, techniques, _ = CASES[case]
    return {
        "model": model,
        "data": {"train": "builtin:stdlib-docs", "max_length": 32, "max_train_samples": 64, **data},
        "training": {
            "output_dir": str(out),
            "max_steps": N,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "linear",  # the lr moves every step: a scheduler not restored would show
            "logging_steps": 1,
            "seed": 0,
            "save_strategy": "steps",
            "save_steps": K,
            "dataloader_pin_memory": False,
        },
        "techniques": techniques,
    }


def history(log_history: list[dict]) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["grad_norm"]) for e in log_history if "loss" in e]


def train_steps(out: Path, case: str, resume: str | None = None) -> list[tuple[int, float, float]]:
    trainer = build(Recipe.parse(recipe_dict(out, case))).trainer
    trainer.train(resume_from_checkpoint=resume)
    return history(trainer.state.log_history)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is as fast, and far faster on a shared machine (the other runs' processes)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """``straight_run(case)`` -> (history of N straight steps, its checkpoint-K folder); each case runs once."""
    runs: dict[str, tuple[list, str]] = {}

    def run(case: str) -> tuple[list, str]:
        if case not in runs:
            out = tmp_path_factory.mktemp("straight")
            runs[case] = (train_steps(out, case), str(out / f"checkpoint-{K}"))
        return runs[case]

    return run


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_resume_is_exact(tmp_path, case, straight_run):
    straight, checkpoint = straight_run(case)
    resumed = train_steps(tmp_path / "resumed", case, resume=checkpoint)
    assert [s for s, *_ in straight] == list(range(1, N + 1))
    assert resumed == straight  # bitwise: == on the floats


STATEFUL = [c for c, (*_, matters) in CASES.items() if matters]


@pytest.mark.parametrize("case", STATEFUL, ids=STATEFUL)
def test_dropping_technique_state_breaks_resume(tmp_path, case, monkeypatch, straight_run):
    """The configs above really exercise the state: without ``efftrain_state.pt`` the resumed run goes wrong
    (other losses after K, or, for progressive_stacking, an optimizer that no longer fits the model)."""
    import hf_efftrain.core.trainer

    straight, checkpoint = straight_run(case)
    monkeypatch.setattr(hf_efftrain.core.trainer, "load_technique_state", lambda *a, **k: None)
    try:
        resumed = train_steps(tmp_path / "resumed", case, resume=checkpoint)
    except ValueError as e:  # progressive_stacking: the 2-layer optimizer state does not fit a 1-layer model
        assert case == "progressive_stacking" and "parameter group" in str(e)
        return
    assert resumed[:K] == straight[:K]
    assert resumed[K:] != straight[K:]


# ---- 2-process DDP (gloo on CPU), through the CLI ----------------------------------------------------------------
# State that differs between processes unless the technique makes it global: the importance table and the loss
# history (both reduced over processes), masks and RigL's gradient all-reduce; plus token_masking's batch counter.
DDP_CASES = {
    "token_dropping/importance+token_masking": 29561,
    "sparse_training/rigl": 29563,
    "selective_backprop": 29565,
}


def launch(recipe: dict, path: Path, port: int) -> None:
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml"]
    cmd += ["--main_process_port", str(port), "-m", "hf_efftrain", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def ddp_history(out: Path) -> list[tuple[int, float, float]]:
    report = json.loads((out / "run_report.json").read_text())
    assert report["world_size"] == 2 and report["distributed_type"] == "MULTI_CPU"
    state = json.loads((out / f"checkpoint-{N}" / "trainer_state.json").read_text())
    return history(state["log_history"])


@pytest.mark.slow
@pytest.mark.parametrize("case", DDP_CASES, ids=list(DDP_CASES))
def test_resume_is_exact_under_ddp(tmp_path, case):
    port = DDP_CASES[case]
    launch(recipe_dict(tmp_path / "straight", case), tmp_path / "straight.yaml", port)
    resumed = recipe_dict(tmp_path / "resumed", case)
    resumed["training"]["resume_from_checkpoint"] = str(tmp_path / "straight" / f"checkpoint-{K}")
    launch(resumed, tmp_path / "resumed.yaml", port)
    straight = ddp_history(tmp_path / "straight")
    assert [s for s, *_ in straight] == list(range(1, N + 1))
    assert ddp_history(tmp_path / "resumed") == straight
