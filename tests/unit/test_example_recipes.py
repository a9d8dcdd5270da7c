"""recipes/examples/: real-model LoRA / QLoRA SFT recipes, checked offline as far as offline goes. Each recipe must
load (every section validated: model, data with its chat format, training, techniques), pin its hub model to a
commit, and carry in its header the `hf-efftrain plan` commands and their output for 1 GPU and for 8 GPUs under
ZeRO-3; those commands are rerun here from the shipped config.json and must print exactly what the header shows.
Tokenizer, chat template and data need the Hub: `hf-efftrain validate recipes/examples/<name>.yaml` checks them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from hf_efftrain.core.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "recipes" / "examples").glob("*.yaml"))
MODELS = ("llama3.1-8b", "qwen2.5-7b", "mistral-7b", "gemma2-9b")


def header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return lines


def plan_commands(path: Path) -> list[tuple[list[str], str]]:
    """(argv after `hf-efftrain`, printed output) for each `$ hf-efftrain plan ...` block of the header."""
    lines, blocks, i = header(path), [], 0
    while i < len(lines):
        if lines[i].startswith("$ hf-efftrain plan"):
            command = lines[i][2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + lines[i].strip()
            i += 1
            output = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            blocks.append((shlex.split(command)[1:], "\n".join(output).strip()))
        else:
            i += 1
    return blocks


def test_every_model_has_a_lora_and_a_qlora_recipe():
    assert sorted(p.stem for p in EXAMPLES) == sorted(f"{m}-{k}" for m in MODELS for k in ("lora", "qlora"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_recipe_loads_pins_a_commit_and_names_its_launch_lines(path):
    recipe = load_recipe(path)
    assert re.fullmatch(r"[0-9a-f]{40}", recipe.model.revision or ""), "model.revision must be a commit"
    assert "/" in recipe.model.name_or_path and not Path(recipe.model.name_or_path).exists()  # a hub id
    assert recipe.data.format == "messages" and recipe.model.dtype == "bfloat16"
    names = recipe.technique_names()
    assert {"peft", "gradient_checkpointing", "packing", "mixed_precision"} <= set(names)
    assert ("quantized_base" in names) == path.stem.endswith("-qlora")
    text = "\n".join(header(path))
    rel = str(path.relative_to(ROOT))
    assert f"accelerate launch --num_processes 1 -m hf_efftrain train {rel}" in text
    configs = re.findall(r"accelerate launch --config_file (\S+)", text)
    assert configs and all((ROOT / c).is_file() for c in configs)
    assert f"hf-efftrain merge {recipe.output_dir}" in text


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_header_plans_are_what_the_planner_prints(path, monkeypatch):
    from hf_efftrain.cli import _parser
    from hf_efftrain.plan.report import plan_from_args, render

    monkeypatch.chdir(ROOT)
    blocks = plan_commands(path)
    assert len(blocks) == 2 and "--accelerate-config" in blocks[1][0]
    for argv, printed in blocks:
        args = _parser().parse_args(argv)
        config = Path(next(o for o in args.overrides if o.startswith("model.name_or_path=")).split("=", 1)[1])
        assert json.loads((config / "config.json").read_text())["architectures"]  # a published config.json
        plan = plan_from_args(args)
        assert render(plan) == printed, f"{path.name}: rerun `hf-efftrain {shlex.join(argv)}` and paste its output"
        assert plan["fits"] is True
