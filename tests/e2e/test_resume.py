"""Resume after faults: a run SIGKILLed in the middle of a save, a truncated newest checkpoint, a checkpoint of the
stock Trainer, and the ``--resume`` flag's errors. docs/FAULTS.md, "Training faults"."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from hf_efftrain import Recipe
from hf_efftrain.cli import EXIT_USER_ERROR, main
from hf_efftrain.core.build import build
from hf_efftrain.core.run import train
from hf_efftrain.runtime.checkpoint import MANIFEST_FILE, STAGING_DIR, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# `hf-efftrain` with one checkpoint's save held up after the weights and optimizer are written (before the RNG
# state), so that the test can SIGKILL it in the middle of that save.
SLOW_SAVE = """
import os, sys, time
from transformers import Trainer
real = Trainer._save_rng_state
def save_rng_state(self, output_dir):
    if self.state.global_step == int(os.environ["SLOW_SAVE_STEP"]):
        print("SAVING", output_dir, flush=True)
        time.sleep(300)
    return real(self, output_dir)
Trainer._save_rng_state = save_rng_state
from hf_efftrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def recipe_file(tmp_path, tiny_recipe, **training) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(training={"save_strategy": "steps", "save_steps": 2, **training})))
    return path


def test_sigkill_during_a_save_falls_back_to_the_last_complete_checkpoint(tmp_path, tiny_recipe):
    path = recipe_file(tmp_path, tiny_recipe)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, "train", str(path)],
        cwd=ROOT,
        env={**ENV, "SLOW_SAVE_STEP": "4"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    for line in proc.stdout:
        if line.startswith("SAVING") or time.time() > deadline:
            break
    staged = out / STAGING_DIR / "checkpoint-4"
    assert line.startswith("SAVING") and (staged / "model.safetensors").exists()  # killed half-way through
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "checkpoint-4").exists() and verify_checkpoint(str(out / "checkpoint-2")) is None

    assert train(path, resume=True)["steps"] == 6
    assert not (out / STAGING_DIR).exists()  # the dead save's leftovers were cleared
    assert all(verify_checkpoint(str(out / f"checkpoint-{s}")) is None for s in (2, 4, 6))
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]  # 3-4 done again, once


def test_truncated_newest_checkpoint_is_skipped_and_resume_is_exact(tmp_path, tiny_recipe, caplog):
    data = tiny_recipe(training={"save_strategy": "steps", "save_steps": 2})
    out = tmp_path / "run"
    train(Recipe.parse(data))
    uninterrupted = load_file(out / "model.safetensors")
    weights = out / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # e.g. a copy cut short, or a disk error

    with caplog.at_level(logging.WARNING):
        report = train(Recipe.parse(data), resume=True)
    assert "checkpoint-6: model.safetensors has 1000 bytes, the manifest says" in caplog.text
    assert report["steps"] == 6
    resumed = load_file(out / "model.safetensors")  # from checkpoint-4 + 2 steps: as if never interrupted
    assert all(resumed[k].equal(v) for k, v in uninterrupted.items())
    assert verify_checkpoint(str(out / "checkpoint-6")) is None  # rewritten whole


def test_stock_trainer_checkpoint_is_accepted_with_a_warning(tmp_path, tiny_recipe, caplog):
    data = tiny_recipe(training={"save_strategy": "steps", "save_steps": 2, "max_steps": 4})
    build(Recipe.parse(data)).plain_trainer().train()
    out = tmp_path / "run"
    assert not (out / "checkpoint-4" / MANIFEST_FILE).exists()
    data["training"]["max_steps"] = 6
    with caplog.at_level(logging.WARNING):
        report = train(Recipe.parse(data), resume=True)
    assert "checkpoint-4 has no efftrain_manifest.json (written by the stock Trainer?): using it unverified" in (
        caplog.text
    )
    assert report["steps"] == 6


def test_resume_flag(tmp_path, tiny_recipe, capsys, caplog):
    path = recipe_file(tmp_path, tiny_recipe, max_steps=2)
    missing = tmp_path / "run" / "checkpoint-3"
    assert main(["train", str(path), "--resume", str(missing)]) == EXIT_USER_ERROR  # a typo is an error
    assert capsys.readouterr().err.strip() == f"error: resume: no checkpoint folder at {missing}"

    with caplog.at_level(logging.WARNING):  # nothing to resume yet: start fresh (a job's first start)
        assert main(["train", str(path), "--resume"]) == 0
    assert "resume: no checkpoint in" in caplog.text and "starting from scratch" in caplog.text
    assert main(["train", str(path), "--resume", str(tmp_path / "run" / "checkpoint-2")]) == 0
