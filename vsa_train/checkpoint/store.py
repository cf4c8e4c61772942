"""The checkpoints folder of a run (`run_dir/checkpoints/`): which `step_<N>/` folders there are, which verify,
which one a launch resumes or a rollback returns to, and publishing a written one (manifest last, rename,
retention). Files only, no collectives.
"""
import os
import re
import shutil
import warnings
from pathlib import Path

from ..files import disk_error, fsync_dir, fsync_tree
from .format import MANIFEST, CheckpointError, read_state, verify, write_manifest

_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class Checkpoints:
    """The `checkpoints/` folder of one run directory."""

    def __init__(self, path):
        self.path = Path(path)
        self._good: set[Path] = set()  # directories seen to verify (see `_verifies`)

    def dirs(self) -> list[Path]:
        """Renamed (complete or damaged) checkpoint directories, oldest first; `.tmp-*` ones are not listed."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def step_dir(self, step: int) -> Path:
        return self.path / f"step_{step:08d}"

    def tmp_dir(self, step: int) -> Path:
        return self.path / f".tmp-step_{step:08d}"

    def newest_verified(self, warn: bool = True):
        """Checkpoints whose manifest verifies, newest first, hashed one at a time as the caller asks for them (a
        resume hashes only the newest good one); each one that does not verify is named in a warning."""
        for ckpt in reversed(self.dirs()):
            problem = verify(ckpt)
            if problem is None:
                self._good.add(ckpt)  # retention will not hash it again
                yield ckpt
            elif warn:
                warnings.warn(f"skipping checkpoint {ckpt}: {problem}", stacklevel=2)

    def verified(self, warn: bool = True) -> list[Path]:
        """Every checkpoint whose manifest verifies, oldest first."""
        return list(reversed(list(self.newest_verified(warn))))

    def resume(self) -> Path | None:
        """The newest verified checkpoint (None: there are none); CheckpointError if some exist but none verifies."""
        if not self.dirs():
            return None
        newest = next(self.newest_verified(), None)
        if newest is None:
            raise CheckpointError(f"no checkpoint under {self.path} verifies (see the warnings above); refusing "
                                  f"to start the run over. Move them away to start fresh.")
        return newest

    def last_healthy(self, check: bool = True, evidence=None) -> Path | None:
        """The newest checkpoint whose weights are healthy (`check`: that verifies): saved while the loss was
        healthy, and not refuted by the loss of the step after it, which its weights computed (`evidence`: step
        -> healthy, None if unknown; that loss is the first evidence about the checkpoint's last update)."""
        for ckpt in self.newest_verified() if check else reversed(self.dirs()):
            state = _state(ckpt)
            if state.get("healthy") and (evidence is None or evidence(state["step"] + 1) is not False):
                return ckpt
        return None

    def publish(self, step: int, keep: int) -> Path:
        """Seals `.tmp-step_<step>` (manifest last, fsync, rename), then retention (`_retain`)."""
        tmp, final = self.tmp_dir(step), self.step_dir(step)
        try:
            write_manifest(tmp, step)
            fsync_tree(tmp)
            if final.exists():  # a damaged copy of this step (its manifest did not verify): replaced
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.path)
            self._good.add(final)  # its manifest was just computed from these files
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(err, tmp) from err
        self._retain(step, keep)
        for stale in self.path.glob(".tmp-*"):  # left by an earlier crash mid-save
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        for stale in self.path.glob(".discarded-*"):  # left by a crash during `discard_after`
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def discard_after(self, step: int) -> int:
        """A rollback to `step`: the checkpoints above it hold the abandoned trajectory; none may be resumed.
        Each is renamed to `.discarded-step_N` first (atomic; the rename is fsynced before any deletion), so a
        crash mid-way leaves nothing a resume would choose; the next publish removes what a crash left."""
        doomed = [c for c in self.dirs() if int(c.name[5:]) > step]
        aside = [self.path / f".discarded-{c.name}" for c in doomed]
        for ckpt, to in zip(doomed, aside):
            shutil.rmtree(to, ignore_errors=True)
            os.replace(ckpt, to)
            self._good.discard(ckpt)
        if doomed:
            fsync_dir(self.path)
        for to in aside:
            shutil.rmtree(to, ignore_errors=True)
        return len(doomed)

    def _retain(self, step: int, keep: int) -> None:
        """Retention after publishing `step`: only checkpoints that verify count toward `keep` (a damaged one
        must never push out the one just written), and the healthy ones a rollback may need stay. A damaged
        one above `step` is set aside (`.damaged-step_N`): the launch resumed below it, so a later one must not
        choose it once it is repaired or half-written files settle."""
        newer = [c for c in self.dirs() if int(c.name[5:]) > step]
        for ckpt in newer:
            if not self._verifies(ckpt):
                aside = self.path / f".damaged-{ckpt.name}"
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(ckpt, aside)
                warnings.warn(f"checkpoint {ckpt} does not verify and lies above the resumed trajectory "
                              f"(now at step {step}): moved aside to {aside}", stacklevel=2)
        older = [c for c in self.dirs() if int(c.name[5:]) < step]
        keeping = {self.step_dir(step)}  # just written and sealed: it counts without being hashed again
        for ckpt in reversed(older):
            if len(keeping) >= keep:
                break
            if self._verifies(ckpt):
                keeping.add(ckpt)
        keeping |= self._rollback_points(step, older)
        for ckpt in older:
            if ckpt not in keeping:
                shutil.rmtree(ckpt, ignore_errors=True)

    def _rollback_points(self, step: int, older: list[Path]) -> set[Path]:
        """The checkpoints a rollback may still need: newest first, each healthy one that verifies and that the
        losses in `step`'s state.json do not refute, up to the first one they confirm (or know nothing of); the
        one just written is not yet confirmed, so the previous healthy one stays too."""
        verdicts = _state(self.step_dir(step)).get("recent_healthy")
        verdicts = verdicts if isinstance(verdicts, list) else []
        points = set()
        for ckpt in [self.step_dir(step), *reversed(older)]:
            state = _state(ckpt)
            back = step - (state.get("step", step) + 1)  # the verdict of the step after it, counted from the end
            known = verdicts[-1 - back] if 0 <= back < len(verdicts) else None
            if not state.get("healthy") or known is False or not self._verifies(ckpt):
                continue
            points.add(ckpt)
            if back >= 0:  # confirmed, or too old to know: no older one is needed
                break
        return points

    def _verifies(self, ckpt: Path) -> bool:
        """verify(), remembered per directory: retention runs at every save and must not hash each old
        checkpoint each time (a checkpoint is written once; one damaged after it was verified is caught at
        resume, which verifies again)."""
        if ckpt not in self._good:
            if verify(ckpt) is not None:
                return False
            self._good.add(ckpt)
        return True


def _state(ckpt: Path) -> dict:
    """state.json, or {} where it cannot be read or has no integer step (such a checkpoint is no rollback point)."""
    try:
        state = read_state(ckpt)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state.get("step"), int) else {}


def resolve_checkpoint(path) -> tuple[Path, Path]:
    """(run_dir, checkpoint dir) from a run directory (its newest verified checkpoint) or a checkpoint directory."""
    path = Path(path)
    if (path / MANIFEST).is_file() or _STEP_DIR.match(path.name):
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
        return path.parent.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a run directory nor a checkpoint directory")
    ckpt = Checkpoints(path / "checkpoints").resume()
    if ckpt is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (looked in {path / 'checkpoints'})")
    return path, ckpt
