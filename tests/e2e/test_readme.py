"""Every command in README.md's ```bash / ```sh blocks works as written from a fresh clone after `make setup`.

The cheap ones are run exactly as written (one `bash -c` each), in the environment `source .venv/bin/activate`
gives (the README says to activate it before the first bare `hf-efftrain` / `accelerate` command), with no
test-only variables such as HF_HUB_OFFLINE, in a temporary working directory holding copies of `recipes/`,
`accelerate_configs/` and the benchmark matrices, so nothing is written into the repository. Each must exit 0.
A command shown with its output (a bash block followed directly by a plain ``` block) must print that output.

The expensive ones are in SKIP with the reason. Every README command is either run or in SKIP, and every SKIP
entry is still in the README, so a new command cannot silently escape this test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ACTIVATE = "source .venv/bin/activate"
SHELL_LANGS = {"bash", "sh", "shell"}

SKIP = {
    "make demo": "two full trainings (quickstart then SFT), minutes on 2 CPU cores",
    "make test": "the whole test suite, this test included",
    "accelerate launch --config_file accelerate_configs/<config>.yaml -m hf_efftrain train recipes/quickstart.yaml": (
        "a template (<config>) for 2-process or GPU launches; the CPU configs run in tests/e2e/test_distributed.py"
    ),
    "hf-efftrain bench benchmarks/memory.yaml": "a full benchmark matrix (many trainings)",
    "hf-efftrain bench benchmarks/fast_pretrain.yaml": "a full benchmark matrix (many trainings)",
    "hf-efftrain bench benchmarks/optimizers.yaml --quick": (
        "six training subprocesses, minutes on 2 CPU cores; the bench runner is covered by tests/unit/test_bench.py"
    ),
    "bash scripts/gpu_check.sh": "needs a CUDA GPU",
    "bash scripts/gpu_bench.sh": "needs a CUDA GPU",
    "bash scripts/gpu_bench.sh --cpu-smoke": "nine training subprocesses; run by tests/e2e/test_gpu_bench.py",
    "hf-efftrain merge runs/llama3.1-8b-lora --dtype bfloat16": "needs a finished LoRA run of an 8B model (the hub)",
}

# Run as written. `hf-efftrain train` commands get `--set training.max_steps=2` appended (a later --set of the
# same key wins), so the README's 50-step example takes seconds; everything else is run unchanged.
CHEAP = re.compile(r"^hf-efftrain (validate|techniques|plan)\b|^hf-efftrain train\b|(^| )--help$")
TRAIN_SUFFIX = " --set training.max_steps=2"


def readme_blocks() -> list[tuple[str, list[str], str | None]]:
    """(language, commands, the plain block right after it or None) for each fenced shell block, in order.
    A command is a non-empty, non-comment line with its trailing `# comment` removed (`\\` continuations joined)."""
    text = README.read_text()
    fences = list(re.finditer(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", text, re.M | re.S))
    blocks = []
    for i, m in enumerate(fences):
        lang = m.group(1).lower()
        if lang not in SHELL_LANGS:
            continue
        body = m.group(2).replace("\\\n", " ")
        commands = []
        for line in body.splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line.strip()).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
        output = None
        if i + 1 < len(fences):
            nxt = fences[i + 1]
            if nxt.group(1) == "" and not text[m.end() : nxt.start()].strip():
                output = nxt.group(2)
        blocks.append((lang, commands, output))
    return blocks


def readme_commands() -> list[str]:
    return [c for _, commands, _ in readme_blocks() for c in commands]


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = readme_commands()
    assert commands, "no ```bash blocks found in README.md"
    unknown = [c for c in commands if c != ACTIVATE and c not in SKIP and not CHEAP.search(c)]
    assert not unknown, f"README commands neither run by this test nor in its SKIP table: {unknown}"
    stale = [c for c in SKIP if c not in commands]
    assert not stale, f"SKIP entries no longer in README.md (remove them): {stale}"


def test_readme_says_to_activate_before_bare_commands():
    commands = readme_commands()
    assert ACTIVATE in commands, f"README.md must show `{ACTIVATE}` in a ```bash block"
    first_bare = next(i for i, c in enumerate(commands) if re.match(r"(hf-efftrain|accelerate)\b", c))
    assert commands.index(ACTIVATE) < first_bare, f"`{ACTIVATE}` must come before `{commands[first_bare]}`"


def _activated_env() -> dict[str, str]:
    """The environment of a user's shell after `source .venv/bin/activate` in the repository root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_", "HF_DATASETS_", "PYTEST_"))}
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run(
        ["bash", "-c", f"{ACTIVATE} && command -v hf-efftrain accelerate && env -0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    first, _, rest = out.stdout.partition(b"\n")
    second, _, rest = rest.partition(b"\n")
    venv_bin = (ROOT / ".venv" / "bin").resolve()
    for exe in (first, second):
        assert Path(exe.decode()).resolve().parent == venv_bin, f"{exe!r} is not from .venv/bin after activation"
    return dict(item.split("=", 1) for item in rest.decode().split("\0") if "=" in item)


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copytree(ROOT / "recipes", work / "recipes")
    shutil.copytree(ROOT / "accelerate_configs", work / "accelerate_configs")
    shutil.copytree(ROOT / "benchmarks", work / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    return work


@pytest.mark.slow  # five CLI processes (~15 s each on 2 busy CPU cores)
@pytest.mark.timeout(900)
def test_cheap_readme_commands_exit_0_as_written(tmp_path):
    env = _activated_env()
    work = _workdir(tmp_path)
    ran, failures = [], []
    for _, commands, output in readme_blocks():
        for cmd in commands:
            if cmd == ACTIVATE or cmd in SKIP:
                continue
            line = cmd + TRAIN_SUFFIX if cmd.startswith("hf-efftrain train") else cmd
            proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)
            ran.append(cmd)
            if proc.returncode != 0:
                failures.append(f"`{line}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            elif output is not None and len(commands) == 1 and proc.stdout.strip() != output.strip():
                failures.append(f"`{line}` printed something else than the README shows:\n{proc.stdout}")
    assert ran, "no README command was run"
    assert not failures, "\n\n".join(failures)
