"""Atomic checkpoints: `accelerator.save_state` into a temporary directory, fsync, then one rename.

A checkpoint directory `run_dir/checkpoints/step_<step>` exists only once complete, so a crash (or a SLURM
preemption) while saving leaves at most a `.tmp-*` directory, which is ignored and later deleted, and the
previous checkpoint stays loadable. The latest checkpoint is found by scanning, with no pointer file to go stale.
"""
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_COMPLETE = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _COMPLETE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _fsync_tree(path: Path) -> None:
    """Flushes every file and directory under path to disk, so the rename below publishes durable data."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Accelerator, run_dir, step: int, keep: int) -> Path:
    """Saves the accelerator state (model, optimizer, RNG of every rank, registered objects) as step `step`.

    Collective: every rank must call it. Keeps the newest `keep` complete checkpoints.
    """
    root = checkpoint_dir(run_dir)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if final.exists():  # this exact state is already saved (e.g. a resumed run that had nothing left to do)
        return final
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # rank 0 writes weights and optimizer, each rank its RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
        for stale in root.glob(".tmp-*"):  # left by an earlier crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
