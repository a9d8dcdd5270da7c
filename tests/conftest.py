"""Shared test set-up: offline, quiet, one cache for the whole session (the built-in tokenizer and corpora
are built once), tiny runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

try:  # property tests (tests/unit/test_fuzz_recipe.py): the same examples on every run, no example database
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # the `test` extra brings hypothesis; without it only the fuzz tests fail to import
    pass


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def log_to_this_tests_stderr():
    """main() configures logging once per process (basicConfig); let it bind to this test's captured stderr, not
    to a stream an earlier test closed (which prints a logging traceback that is no part of the product)."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [h for h in saved if type(h) is not logging.StreamHandler]
    yield
    root.handlers = saved


@pytest.fixture(scope="session")
def train_keeping_built():
    """``train_keeping_built(recipe_dict) -> (run report, Built)``: ``run.train`` (what `hf-efftrain train` runs),
    keeping what it built, so a test can compare the trained model with what was saved."""
    from hf_efftrain import Recipe
    from hf_efftrain.core import build as build_mod
    from hf_efftrain.core import run as run_mod

    def train(recipe: dict):
        seen = {}

        def capture(r, env=None):
            seen["built"] = build_mod.build(r, env)
            return seen["built"]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run_mod, "build", capture)
            report = run_mod.train(Recipe.parse(recipe))
        return report, seen["built"]

    return train


@pytest.fixture
def tiny_recipe(tmp_path):
    """``tiny_recipe(**sections)``: a recipe dict for a few-step run on built-in data (sections are merged)."""
    return lambda **sections: _tiny_recipe(tmp_path, **sections)


def _tiny_recipe(tmp_path: Path, **sections) -> dict:
    recipe = {
        "model": {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 2}},
        "data": {"train": "builtin:stdlib-docs", "max_length": 64, "max_train_samples": 256, "max_eval_samples": 32},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "lr_scheduler_type": "constant",
            "seed": 0,
            "dataloader_pin_memory": False,
        },
        "techniques": [],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and key in ("model", "data", "training"):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


@pytest.fixture(autouse=True)
def _fresh_bitsandbytes_overrides():
    """The Trainer registers 32-bit overrides in bitsandbytes' process-wide GlobalOptimManager keyed by
    id(param); a later test's parameter can reuse such an id and silently get 32-bit state. Start clean."""
    import sys

    if "bitsandbytes" in sys.modules:
        sys.modules["bitsandbytes"].optim.GlobalOptimManager.get_instance().initialize()
    yield
