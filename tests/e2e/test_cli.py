"""The `hf-efftrain` command as a user runs it: real subprocesses, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "hf_efftrain"]


def cli(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def test_techniques_table_lists_every_registered_technique():
    from hf_efftrain import all_techniques

    out = cli("techniques").stdout
    assert out.splitlines()[0].split()[:3] == ["name", "survey", "section"]
    for name, cls in all_techniques().items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert cls.survey_section in line and cls.paper.split()[0] in line


def test_validate_ok_and_user_error_exit_2_without_traceback(tmp_path, tiny_recipe):
    ok = cli("validate", "recipes/quickstart.yaml")
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tiny_recipe(techniques=[{"name": "bf16"}, {"name": "lion", "weight_decay": -0.1}])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    for command in ("validate", "train"):
        res = cli(command, str(path))
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines()[-1] == ("error: techniques[1].weight_decay: must be >= 0 (got -0.1)")
        assert "Traceback" not in res.stderr
    res = cli("train", str(path), "--set", "training.max_steps=many")
    assert res.returncode == 2 and "training.max_steps: Input should be a valid integer" in res.stderr


def test_train_prints_summary_and_overrides_apply(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()))
    out = tmp_path / "cli_run"
    res = cli(
        "train",
        str(path),
        "--set",
        "training.max_steps=3",
        "--set",
        "techniques.lion.lr=2e-3",
        "--output-dir",
        str(out),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train loss (first -> final)" in res.stdout and "tokens/s" in res.stdout
    report = json.loads((out / "run_report.json").read_text())
    assert report["steps"] == 3 and report["techniques"][0]["config"]["lr"] == 2e-3


def test_killed_run_leaves_no_report(tmp_path, tiny_recipe):
    out = tmp_path / "killed"
    out.mkdir()
    (out / "run_report.json").write_text('{"stale": true}')  # from an earlier run in the same folder
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(training={"max_steps": 100000, "output_dir": str(out)})))
    proc = subprocess.Popen(
        [*CLI, "train", str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training has really started
        if "'loss'" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "run_report.json").exists()


def test_a_recipe_refused_while_building_leaves_the_earlier_runs_report(tmp_path, tiny_recipe):
    from hf_efftrain import Recipe, RecipeError, train

    out = tmp_path / "run"
    out.mkdir()
    (out / "run_report.json").write_text('{"steps": 3}')  # a finished earlier run in the same folder
    data = {"train": "builtin:chat-synthetic"}  # the template is refused while building, after the recipe parsed
    bad = tiny_recipe(model={"chat_template": "llama3"}, data=data, training={"output_dir": str(out)})
    with pytest.raises(RecipeError, match="model.chat_template: llama3 writes"):
        train(Recipe.parse(bad))
    assert (out / "run_report.json").read_text() == '{"steps": 3}'


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(techniques=[{"name": "lion"}])))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "accelerate_configs/cpu_ddp.yaml",
            "--main_process_port",
            "29517",
            "-m",
            "hf_efftrain",
            "train",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    assert report["world_size"] == 2 and report["distributed_type"] == "MULTI_CPU"
    assert report["steps"] == 6 and res.stdout.count("train loss (first -> final)") == 1  # main process only
