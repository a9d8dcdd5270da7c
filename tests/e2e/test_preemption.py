"""Preemption as a scheduler does it: a real SIGTERM to a real ``hf-efftrain train`` (and to one rank of a
2-process ``accelerate launch``) ends in a verified checkpoint and exit code EXIT_PREEMPTED; ``--resume`` then
finishes the run exactly as an uninterrupted one. docs/FAULTS.md, "Training faults"."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from hf_efftrain.cli import EXIT_PREEMPTED
from hf_efftrain.runtime.checkpoint import MANIFEST_FILE, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
CLI = [sys.executable, "-m", "hf_efftrain", "train"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml"]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_training(proc: subprocess.Popen, timeout: float = 300) -> list[str]:
    """Read output until the Trainer has logged a loss (training really runs)."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if "'loss'" in line or time.time() > deadline:
            break
    return lines


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)


def test_sigterm_saves_exits_75_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"  # save_strategy "no": the preemption checkpoint is the only one
    path.write_text(yaml.safe_dump(tiny_recipe(training={"max_steps": 30})))
    out = tmp_path / "run"
    proc = start([*CLI, str(path)])
    wait_for_training(proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    step = int(re.search(r"error: preempted at step (\d+): checkpoint saved to (\S+);", output).group(1))
    assert 1 <= step < 30 and "Traceback" not in output
    assert verify_checkpoint(str(out / f"checkpoint-{step}")) is None
    assert not (out / "run_report.json").exists()  # the run did not finish: no report claims it did

    resumed = run([*CLI, str(path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "run_report.json").read_text())["steps"] == 30
    reference = run([*CLI, str(path), "--output-dir", str(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr[-3000:]
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in b)  # same data order, RNG, optimizer and schedule after the resume


def worker(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == str(rank) and "hf_efftrain" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                continue
        time.sleep(0.5)
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(training={"max_steps": 30})))
    out = tmp_path / "run"
    launch = [*LAUNCH, "--main_process_port", "29531", "-m", "hf_efftrain", "train", str(path)]
    proc = start(launch)
    wait_for_training(proc)
    worker(proc, rank=1).send_signal(signal.SIGTERM)  # rank 0 gets no signal: it must learn it from rank 1
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0  # the launcher reports its workers' non-zero exit
    steps = re.findall(r"error: preempted at step (\d+)", output)
    assert len(steps) == 2 and steps[0] == steps[1], output[-3000:]  # both ranks, the same step
    folder = out / f"checkpoint-{steps[0]}"
    assert verify_checkpoint(str(folder)) is None
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)  # every rank's part is in the manifest

    resumed = run([*LAUNCH, "--main_process_port", "29532", "-m", "hf_efftrain", "train", str(path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["steps"] == 30 and report["world_size"] == 2
