"""``scripts/gpu_bench.sh --cpu-smoke``: the one-shot GPU benchmark's matrices, shrunk to a 3-layer model and two
steps, run on the CPU, so that the script, its matrices and every technique they name keep working on machines
without the GPU (issue 14: "it must also dry-run on CPU in the test suite so it cannot rot")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MATRICES = {
    "gpu_1b": {"baseline", "fast", "fast_eager", "low_memory"},
    "gpu_token_dropping": {"baseline", "packed_1024", "td_1024", "packed_2048", "td_2048"},
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_bench_cpu_smoke_runs_every_row(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_bench.sh"), "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=880)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for name, rows in MATRICES.items():
        assert f"## {name}" in summary
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["errors"] == {} and set(results["rows"]) == rows
        for row, data in results["rows"].items():
            run = data["runs"][0]
            assert run["tokens_per_second"] > 0, row
            assert run["planned_peak_bytes"], row  # the planner's prediction beside the measured peak
    recipes = json.loads((tmp_path / "gpu_1b" / "results.json").read_text())["recipes"]
    assert [t["name"] for t in recipes["baseline"]["techniques"]] == ["bf16"]  # a bf16 stock-Trainer baseline
    assert recipes["fast"]["training"]["optim"] == "adamw_torch_fused"


def test_gpu_bench_rejects_unknown_flags():
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_bench.sh"), "--gpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
