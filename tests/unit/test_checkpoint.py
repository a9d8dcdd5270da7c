"""checkpoint.py: manifests, verification and fallback, staged saves, write failures, SIGTERM in-process."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess

import pytest
import torch
import yaml
from transformers import TrainerCallback

from hf_efftrain import Recipe
from hf_efftrain.cli import EXIT_IO_ERROR, main
from hf_efftrain.core.build import build
from hf_efftrain.runtime.checkpoint import (
    MANIFEST_FILE,
    STAGING_DIR,
    CheckpointError,
    OutputWriteError,
    Preempted,
    latest_valid_checkpoint,
    list_checkpoints,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)


def fake_checkpoint(root, step: int, manifest: bool = True, trainer_state: bool = True):
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "sub" / "part.bin").write_bytes(b"x" * 100)
    if trainer_state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if manifest:
        write_manifest(str(folder), step)
    return folder


def test_manifest_catches_truncation_bit_flips_and_missing_files(tmp_path):
    folder = fake_checkpoint(tmp_path, 2)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["step"] == 2 and set(manifest["files"]) == {
        "model.safetensors",
        "sub/part.bin",
        "trainer_state.json",
    }
    assert manifest["files"]["sub/part.bin"]["size"] == 100
    assert verify_checkpoint(str(folder)) is None

    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:1000])
    assert verify_checkpoint(str(folder)) == "model.safetensors has 1000 bytes, the manifest says 4096"
    (folder / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    assert verify_checkpoint(str(folder)) == "model.safetensors fails its sha256 checksum"
    (folder / "model.safetensors").write_bytes(data)
    (folder / "sub" / "part.bin").unlink()
    assert verify_checkpoint(str(folder)) == "sub/part.bin is missing"
    (folder / MANIFEST_FILE).write_text("{not json")
    assert verify_checkpoint(str(folder)).startswith("unreadable manifest")


def test_fallback_to_the_newest_valid_checkpoint(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10, manifest=False, trainer_state=False)  # a save cut short, stock-Trainer style
    newest = fake_checkpoint(tmp_path, 12)
    (newest / "model.safetensors").write_bytes(b"")
    (tmp_path / STAGING_DIR / "checkpoint-14").mkdir(parents=True)  # a save in progress is not a candidate
    (tmp_path / "checkpoint-foo").mkdir()
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [12, 10, 2]
    with caplog.at_level(logging.WARNING):
        assert latest_valid_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    text = caplog.text
    assert "checkpoint-12: model.safetensors has 0 bytes" in text
    assert "checkpoint-10: no manifest and no trainer_state.json" in text
    assert latest_valid_checkpoint(str(tmp_path), before_step=2) is None
    assert resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_stock_checkpoint_without_manifest_is_used_with_a_warning(tmp_path, caplog):
    fake_checkpoint(tmp_path, 4, manifest=False)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert "has no efftrain_manifest.json (written by the stock Trainer?): using it unverified" in caplog.text


def test_resume_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="resume: no valid checkpoint in .*: there is none"):
        resolve_resume(True, str(tmp_path))
    with pytest.raises(CheckpointError, match="resume: no checkpoint folder at .*checkpoint-99"):
        resolve_resume(str(tmp_path / "checkpoint-99"), str(tmp_path))
    bad = fake_checkpoint(tmp_path, 3)
    (bad / "sub" / "part.bin").write_bytes(b"y")
    with pytest.raises(CheckpointError, match="checkpoint-3 is not a usable checkpoint: sub/part.bin has 1 bytes"):
        resolve_resume(str(bad), str(tmp_path))  # named on purpose: an error, not a fallback
    with pytest.raises(CheckpointError, match="none of checkpoint-3 is complete"):
        resolve_resume(True, str(tmp_path))


# ---- real saves ---------------------------------------------------------------------------------------------------
def saving_recipe(tiny_recipe, **training):
    return Recipe.parse(tiny_recipe(training={"max_steps": 6, "save_strategy": "steps", "save_steps": 2, **training}))


def test_staged_saves_carry_a_manifest_and_rotate_after_commit(tiny_recipe, tmp_path):
    built = build(saving_recipe(tiny_recipe, save_total_limit=2))
    built.trainer.train()
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "."))) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    for step in (4, 6):
        folder = out / f"checkpoint-{step}"
        assert verify_checkpoint(str(folder)) is None
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
            files
        )
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step


@pytest.mark.parametrize("fault", ["enospc_in_torch_save", "eacces_on_rename", "file_in_the_way"])
def test_write_failure_is_one_clear_error_and_keeps_the_previous_checkpoint(tiny_recipe, tmp_path, monkeypatch, fault):
    built = build(saving_recipe(tiny_recipe))
    trainer = built.trainer
    out = tmp_path / "run"
    real_save, real_replace = torch.save, os.replace

    def save(obj, f, *a, **kw):  # the disk fills up while the optimizer of checkpoint-4 is written
        if trainer.state.global_step == 4 and str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    def replace(src, dst):
        if str(dst).endswith("checkpoint-4"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst)

    if fault == "enospc_in_torch_save":
        monkeypatch.setattr(torch, "save", save)
        expected = "No space left on device .*optimizer.pt.*; free disk space; the previous checkpoint checkpoint-2"
    elif fault == "eacces_on_rename":
        monkeypatch.setattr(os, "replace", replace)
        expected = "Permission denied .*checkpoint-4.*; check the path; the previous checkpoint checkpoint-2 is intact"
    else:

        class Block(TrainerCallback):  # e.g. a stray file where the staging folder goes
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 4:
                    (out / STAGING_DIR).write_text("in the way")

        trainer.add_callback(Block())
        expected = "could not write checkpoint .*checkpoint-4: (File exists|Not a directory)"
    with pytest.raises(OutputWriteError, match=expected):
        trainer.train()
    monkeypatch.undo()
    assert verify_checkpoint(str(out / "checkpoint-2")) is None
    assert not (out / "checkpoint-4").exists()
    if fault != "file_in_the_way":
        assert not (out / STAGING_DIR).exists()  # the half-written checkpoint's space is freed


def test_a_real_full_disk(tiny_recipe, tmp_path):
    """A 30 MB tmpfs holds one checkpoint of the tiny model (~17 MB) but not a second: torch.save and safetensors
    fail with their own exception types, which must still read as a full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs (the injected ENOSPC test above covers the logic)")
    try:
        built = build(saving_recipe(tiny_recipe, output_dir=str(disk / "run")))
        with pytest.raises(OutputWriteError, match="No space left on device.*the previous checkpoint checkpoint-2"):
            built.trainer.train()
        assert verify_checkpoint(str(disk / "run" / "checkpoint-2")) is None
        assert not (disk / "run" / STAGING_DIR).exists() and not (disk / "run" / "checkpoint-4").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_run_report_write_failure_exits_74_with_one_line(tiny_recipe, tmp_path, monkeypatch, capsys):
    import hf_efftrain.runtime.metrics

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "run_report.json"))

    monkeypatch.setattr(hf_efftrain.runtime.metrics, "write_run_report", full)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(training={"max_steps": 2, "save_strategy": "steps", "save_steps": 2})))
    assert main(["train", str(path)]) == EXIT_IO_ERROR
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not write the final model and run report in ")
    assert err.endswith("run_report.json); free disk space; the last checkpoint checkpoint-2 is intact")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_process_saves_and_raises_preempted(tiny_recipe, tmp_path, signum):
    built = build(Recipe.parse(tiny_recipe(training={"max_steps": 20})))  # save_strategy "no": still saved

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signum)

    built.trainer.add_callback(Kill())
    before = signal.getsignal(signum)
    with pytest.raises(Preempted, match="preempted at step 4: checkpoint saved to .*checkpoint-4; continue with"):
        built.trainer.train()
    assert signal.getsignal(signum) is before  # handlers are restored
    folder = tmp_path / "run" / "checkpoint-4"
    assert verify_checkpoint(str(folder)) is None
    control = json.loads((folder / "trainer_state.json").read_text())["stateful_callbacks"]["TrainerControl"]
    assert control["args"]["should_training_stop"] is False  # a resume that restores callback states goes on


def test_second_ctrl_c_interrupts_at_once(tiny_recipe, tmp_path):
    built = build(Recipe.parse(tiny_recipe(training={"max_steps": 20})))

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    built.trainer.add_callback(Kill())
    with pytest.raises(KeyboardInterrupt):
        built.trainer.train()
    assert not list_checkpoints(str(tmp_path / "run"))
