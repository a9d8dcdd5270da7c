"""Safe checkpoints, resume and preemption: a run killed at any moment loses at most the work since its last
complete checkpoint, and resume never loads a partial or corrupt one (docs/FAULTS.md, "Training faults").

- ``save_staged``: the Trainer writes ``checkpoint-N`` into ``output_dir/.checkpoint-staging/``; the techniques'
  state and a manifest (step, files, sizes, sha256) are added last, then one ``rename`` puts the folder in place
  and only then are old checkpoints rotated. The staging folder matches neither the Trainer's ``checkpoint-*``
  glob (rotation) nor ``get_last_checkpoint``'s regex, so a save cut short is invisible to both.
- ``latest_valid_checkpoint`` / ``resolve_resume``: newest checkpoint whose manifest verifies; a corrupt one is
  skipped with a warning. A checkpoint without a manifest (written by the stock Trainer) is accepted with a warning
  when its ``trainer_state.json`` is there (the stock Trainer writes it after the weights and optimizer).
- ``Preemption``: SIGTERM/SIGINT ask for a checkpoint at the next step boundary (all ranks agree), then
  ``Preempted`` is raised; a second SIGINT interrupts at once.

Why: long runs die (preempted nodes, OOM kills, full disks); the stock Trainer writes checkpoints in place and
rotates old ones before the new one is complete, so one badly timed kill can leave nothing to resume from.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import RecipeError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "efftrain_manifest.json"
STAGING_DIR = ".checkpoint-staging"  # hidden: not matched by the Trainer's "checkpoint-*" glob or regex
MANIFEST_FORMAT = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's PREFIX_CHECKPOINT_DIR naming
_CHUNK = 1 << 22


# ------------------------------------------------------------------------------------------------------- errors
class TrainingFault(RuntimeError):
    """A run that stopped before ``max_steps`` for a reason the user must act on; the CLI maps each to an exit code
    and prints the message without a traceback."""


class Preempted(TrainingFault):
    """SIGTERM/SIGINT arrived: a checkpoint was written at a step boundary; rerun with ``--resume``."""

    def __init__(self, step: int, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"preempted at step {step}: {where}; continue with: hf-efftrain train RECIPE --resume")


class Diverged(TrainingFault):
    """Too many non-finite steps in a row (divergence_guard, on_diverge: stop or rollbacks used up)."""


class OutputWriteError(TrainingFault):
    """A checkpoint or the run report could not be written (disk full, no permission, a file in the way)."""


class CheckpointError(RecipeError):
    """``--resume`` names a checkpoint that is missing or fails verification (a user error: exit 2)."""

    def __init__(self, message: str):
        super().__init__("resume", message)


@contextlib.contextmanager
def writing(what: str, intact: str | None = None, folder: str | None = None) -> Iterator[None]:
    """Turn an OSError while writing ``what`` (or any error while ``folder``'s disk is full: torch.save and
    safetensors do not raise OSError for that) into one clear ``OutputWriteError`` (no traceback in the CLI)."""
    try:
        yield
    except OSError as e:
        raise write_error(what, e, intact) from None
    except Exception as e:
        if folder is None or not _disk_full(folder):
            raise
        raise write_error(what, _enospc(folder, e), intact) from None


def write_error(what: str, e: OSError, intact: str | None = None) -> OutputWriteError:
    reason = os.strerror(e.errno) if e.errno else str(e)
    hint = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk quota"}.get(e.errno, "check the path")
    kept = f"; {intact} is intact" if intact else ""
    return OutputWriteError(f"could not write {what}: {reason} ({e.filename or e}); {hint}{kept}")


# ----------------------------------------------------------------------------------------------------- manifest
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(f for f in out if f != MANIFEST_FILE)


def write_manifest(folder: str, step: int) -> dict[str, Any]:
    """Record every file of ``folder`` (size, sha256), after fsyncing it, in ``MANIFEST_FILE``: written last."""
    from ..cache import write_json_atomic

    files = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # the bytes the manifest vouches for must be on disk before it is
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    write_json_atomic(os.path.join(folder, MANIFEST_FILE), manifest)
    return manifest


def verify_checkpoint(folder: str) -> str | None:
    """None when ``folder`` is a complete checkpoint, else what is wrong. Files added after the manifest (a
    callback's ``on_save``) are not checked. Without a manifest: ``"no manifest"`` (see ``checkpoint_problem``)."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return "no manifest"
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    for rel, meta in files.items():
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        size = os.path.getsize(file)
        if size != meta["size"]:
            return f"{rel} has {size} bytes, the manifest says {meta['size']}"
        if _sha256(file) != meta["sha256"]:
            return f"{rel} fails its sha256 checksum"
    return None


def checkpoint_problem(folder: str) -> str | None:
    """Like ``verify_checkpoint`` but a manifest-less checkpoint of the stock Trainer passes (with a warning) when
    its ``trainer_state.json`` is there."""
    problem = verify_checkpoint(folder)
    if problem != "no manifest":
        return problem
    if not os.path.isfile(os.path.join(folder, "trainer_state.json")):
        return "no manifest and no trainer_state.json (an incomplete save)"
    logger.warning("%s has no %s (written by the stock Trainer?): using it unverified", folder, MANIFEST_FILE)
    return None


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-N`` folder, newest first (by step, as get_last_checkpoint orders)."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(output_dir, n))
        for n in os.listdir(output_dir)
        if (m := _CHECKPOINT_RE.match(n))
    ]
    return sorted(((s, p) for s, p in found if os.path.isdir(p)), reverse=True)


def latest_valid_checkpoint(output_dir: str, before_step: int | None = None) -> str | None:
    """The newest checkpoint that verifies (optionally with step < ``before_step``); warns about each skipped."""
    for step, path in list_checkpoints(output_dir):
        if before_step is not None and step >= before_step:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s; falling back to an earlier one", path, problem)
    return None


def resolve_resume(resume: bool | str, output_dir: str) -> str:
    """The checkpoint to resume from: ``True`` -> the newest valid one in ``output_dir``; a path -> that one, which
    must exist and verify (a typo or a damaged folder named on purpose is an error, not a silent fresh start)."""
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        found = latest_valid_checkpoint(output_dir)
        if found is None:
            names = [os.path.basename(p) for _, p in list_checkpoints(output_dir)]
            detail = f"none of {', '.join(names)} is complete" if names else "there is none"
            raise CheckpointError(f"no valid checkpoint in {output_dir}: {detail}")
        return found
    path = str(resume)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint folder at {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a usable checkpoint: {problem}")
    return path


# ------------------------------------------------------------------------------------------------------- saving
def save_staged(trainer: Any, save: Callable[[], None], trial: Any, write_extra: Callable[[str], None]) -> str:
    """Run the Trainer's own ``_save_checkpoint`` (``save``) into the staging folder, add ``write_extra``'s files
    and the manifest, rename the folder into place, then rotate. Returns the final path.

    Every rank calls this (each writes its RNG state); the main process finalises. A write failure on any rank
    becomes ``OutputWriteError`` on all of them, with the staging folder removed and earlier checkpoints untouched.
    """
    from transformers.trainer_utils import rotate_checkpoints

    args, state = trainer.args, trainer.state
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"checkpoint-{state.global_step}"
    staging = os.path.join(run_dir, STAGING_DIR)
    staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
    previous = latest_name(run_dir)

    def prepare() -> None:
        if args.should_save:  # leftovers of a save that was killed belong to a dead run
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)

    def write() -> None:
        # The Trainer writes under _get_output_dir(): shadow it on the instance for this one save.
        trainer._get_output_dir = lambda trial=None: staging
        try:
            save()
        finally:
            del trainer._get_output_dir
        if args.should_save:
            write_extra(staged)
            if state.best_model_checkpoint == staged:  # the Trainer saw the staging path
                state.best_model_checkpoint = final
                state.save_to_json(os.path.join(staged, "trainer_state.json"))

    def finish() -> None:
        if args.should_save:
            write_manifest(staged, state.global_step)
            _commit(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, args.save_total_limit, state.best_model_checkpoint, use_mtime=True)

    failed: OSError | None = None
    for step in (prepare, write, finish):  # any_rank after each step is also the barrier between them
        failed = failed or _write_failure(step, staging)
        if any_rank(failed is not None, args.device):
            break
    else:
        return final
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # frees the space a half-written checkpoint took
    failed = failed or OSError(errno.EIO, "another process failed to write its part of the checkpoint", final)
    raise write_error(f"checkpoint {final}", failed, f"the previous checkpoint {previous}" if previous else None)


def _write_failure(step: Callable[[], None], folder: str) -> OSError | None:
    """Run ``step``; return the OSError it raised. torch.save and safetensors report a full disk as RuntimeError /
    SafetensorError, so any other error raised when the disk is full counts as ENOSPC; the rest propagate."""
    try:
        step()
    except OSError as e:
        return e
    except Exception as e:
        if not _disk_full(folder):
            raise
        return _enospc(folder, e)
    return None


def _enospc(folder: str, e: Exception) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{folder}; {type(e).__name__}: {e}")


def _disk_full(folder: str, margin: int = 1 << 20) -> bool:
    probe = folder
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or ".").free < margin
    except OSError:
        return False


def latest_name(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return os.path.basename(found[0][1]) if found else None


def _commit(staged: str, final: str) -> None:
    """Rename ``staged`` to ``final``; a folder already there (the same step saved again) is swapped out first."""
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(staged), "replaced-" + os.path.basename(final))
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(final))


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def any_rank(flag: bool, device: Any) -> bool:
    """True when ``flag`` is true on any process (one all-reduce, only when several processes run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------------------------------- preemption
class Preemption(TrainerCallback):
    """SIGTERM / SIGINT during ``train()``: save a checkpoint at the next step boundary and stop training.

    Handlers are installed only around ``train()`` (``armed``) and only from the main thread. A second SIGINT
    raises KeyboardInterrupt at once (no checkpoint); repeated SIGTERMs (a launcher forwarding the signal) are one
    request. Under several processes the request is all-reduced at every step end so that all ranks stop together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal number
        self.stopped_at: int | None = None
        self.checkpoint: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            logger.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                           "(Ctrl-C again to stop now without one)", signal.Signals(signum).name)  # fmt: skip
        self.requested = signum

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self.requested = self.stopped_at = self.checkpoint = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("train() runs outside the main thread: SIGTERM/SIGINT will not checkpoint")
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.requested is not None, args.device) and state.global_step < state.max_steps:
            self.stopped_at = state.global_step
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        # Stop only now: a stop flag set before the save would be stored with the checkpoint's TrainerControl and,
        # with restore_callback_states_from_checkpoint, end the resumed run after one step.
        if self.stopped_at == state.global_step:
            self.checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            control.should_training_stop = True
        return control

    def raise_if_stopped(self) -> None:
        if self.stopped_at is not None:
            raise Preempted(self.stopped_at, self.checkpoint)
