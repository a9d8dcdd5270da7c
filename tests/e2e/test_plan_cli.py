"""`hf-efftrain plan` as a user runs it: the table, --json, recipes with an accelerate config, user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from hf_efftrain.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_params_table_says_whether_it_fits_and_what_to_change(capsys):
    code, out, _ = run(capsys, "--params", "7B", "--gpu-memory-gb", "80")
    assert code == 0
    assert "7B parameters" in out and "layers=32, hidden=4096" in out  # the derived shape is explained
    for row in ("weights", "gradients", "optimizer states", "activations (blocks)", "predicted peak"):
        assert row in out
    assert "does NOT fit" in out and "cheapest change that fits:" in out

    code, out, _ = run(capsys, "--params", "125M", "--gpu-memory-gb", "80", "--seq-len", "1024", "--batch", "8")
    assert code == 0 and "fits" in out and "does NOT fit" not in out and "cheapest change" not in out


def test_json_is_consistent(capsys):
    code, out, _ = run(capsys, "--params", "13B", "--num-gpus", "8", "--gpu-memory-gb", "40", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["setup"]["strategy"] == "ddp" and plan["setup"]["num_gpus"] == 8
    assert plan["fits"] is False and plan["peak_bytes"] > 40e9
    sug = plan["suggestion"]
    assert sug["peak_bytes"] <= 40e9 and sug["changes"]
    assert plan["peak_bytes"] == max(plan["phases_bytes"]["forward/backward"], plan["phases_bytes"]["optimizer step"])


def test_recipe_with_accelerate_config(capsys, tmp_path, tiny_recipe):
    recipe = tiny_recipe(techniques=[{"name": "gradient_checkpointing"}, {"name": "lion", "bits": 8}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    accel = tmp_path / "z3.yaml"
    accel.write_text(
        yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_processes": 4, "deepspeed_config": {"zero_stage": 3}})
    )
    code, out, _ = run(capsys, str(path), "--accelerate-config", str(accel), "--json")
    assert code == 0
    setup = json.loads(out)["setup"]
    assert (setup["strategy"], setup["num_gpus"]) == ("zero3", 4)
    assert (setup["optimizer"], setup["optimizer_bits"]) == ("lion", 8)
    assert setup["checkpointing"] is True and setup["seq_len"] == recipe["data"]["max_length"]
    assert setup["batch"] == recipe["training"]["per_device_train_batch_size"]


def test_user_errors_exit_2_with_one_message(capsys, tmp_path):
    for args, message in (
        (["--params", "7X"], "error: --params: expected a parameter count such as 7B"),
        ([str(tmp_path / "missing.yaml")], "error: recipe: file not found"),
        ([], "error: plan: give a recipe YAML or --params COUNT"),
        (["--params", "7B", "--offload", "optimizer"], "error: --offload: CPU offload needs ZeRO or FSDP"),
        (["--params", "7B", "--accelerate-config", str(tmp_path / "a.yaml")], "error: --accelerate-config: file"),
    ):
        code, _, err = run(capsys, *args)
        assert code == 2 and err.strip().startswith(message), (args, err)
    # and as a real process: one line on stderr, no traceback
    res = subprocess.run(
        [sys.executable, "-m", "hf_efftrain", "plan", "--params", "7X"], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --params:")
