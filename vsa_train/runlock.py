"""The run directory's lock, run.lock: one writer per run directory, taken over when stale, kept fresh by a heartbeat.

The lock file is JSON (host, pid, its start time, SLURM job, start, token), written by a rename so it is never
missing; nothing in it is executed.
"""
import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

from .errors import RunDirError
from .files import atomic_write, disk_error

LOCK = "run.lock"
HEARTBEAT_S = 10.0  # the lock is refreshed this often (or 4 times per train.lock_stale_s, if that is shorter)
CLAIM_WAIT_S = 30.0  # how long a launch waits for another one's takeover of a stale lock to finish


@contextlib.contextmanager
def hold(path: Path, stale_after_s: float):
    """Holds run.lock for the block: one writer per run directory.

    A lock is stale (taken over with a warning) when its process is gone on this host (or its pid now names
    another process), when it belongs to an earlier allocation of this SLURM job (a requeue), or when its
    holder has not refreshed it for `stale_after_s` seconds (another host that died). Otherwise the launch is
    refused, naming the holder. While held, a heartbeat thread refreshes it whatever the run is doing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
          "slurm_job": slurm_job(), "started": time.time(), "token": uuid.uuid4().hex}
    _acquire(path, json.dumps(me), stale_after_s)
    heartbeat = _Heartbeat(path, me["token"], interval_s=min(HEARTBEAT_S, stale_after_s / 4))
    try:
        yield
    finally:
        heartbeat.stop()
        if _parse_lock(_read_lock(path)).get("token") == me["token"]:
            path.unlink(missing_ok=True)


def slurm_job() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _acquire(path: Path, record: str, stale_after_s: float) -> None:
    """Creates the lock, or takes over a stale one (`_take_over`), or raises RunDirError naming its holder."""
    deadline = time.monotonic() + CLAIM_WAIT_S
    while not _create_exclusive(path, record):
        raw = _read_lock(path)
        if raw is None:
            continue  # released in between
        holder = _parse_lock(raw)
        reason = _stale_reason(holder, path, stale_after_s)
        if reason is None:
            job = f"SLURM job {holder['slurm_job']}; " if holder.get("slurm_job") is not None else ""
            raise RunDirError(f"{path.parent} is in use by {holder.get('host')} pid {holder.get('pid')} ({job}{path}). "
                              f"One writer per run directory: wait for it, or delete {path} if that process is gone.")
        taken = _take_over(path, raw, record)
        if taken:
            warnings.warn(f"taking over the stale lock {path} of {holder.get('host')} pid {holder.get('pid')}: "
                          f"{reason}", stacklevel=4)
            return
        if taken is None:  # another launch holds the claim on this lock: it is about to replace it
            if time.monotonic() > deadline:
                raise RunDirError(f"{path} is being taken over by another launch ({_claim(path, raw)} exists "
                                  f"since {CLAIM_WAIT_S} s); delete that file if no other launch is running")
            time.sleep(0.05)


def _take_over(path: Path, stale: bytes, record: str) -> "bool | None":
    """Replaces the stale lock whose bytes are `stale` by `record`: True if done, False if the lock changed
    meanwhile, None if another launch claimed it. The claim (a file named after those bytes, created
    exclusively) admits one launch per stale lock, and the claimant replaces the lock only if it still holds
    those bytes: two launches that judged one lock stale never both take it over."""
    claim = _claim(path, stale)
    if not _create_exclusive(claim, record):
        return None
    try:
        if _read_lock(path) != stale:
            return False  # taken over (or released) between our read and our claim
        atomic_write(path, record)  # a rename: the lock is never missing, so no O_EXCL create slips in
        return True
    finally:
        claim.unlink(missing_ok=True)  # a later claim on these bytes finds them gone from the lock and gives up


def _claim(path: Path, stale: bytes) -> Path:
    return path.with_name(f"{path.name}.takeover-{hashlib.sha256(stale).hexdigest()[:16]}")


def _create_exclusive(path: Path, text: str) -> bool:
    """Creates `path` holding `text` unless it exists (False). Atomic on NFS too, and never seen empty: the text
    is written to a file of our own, which a hard link then names `path`. A link that NFS made but whose reply
    was lost comes back as "exists"; the link count of our file tells."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        return os.stat(tmp).st_nlink > 1
    except OSError as err:
        raise disk_error(err, path) from err
    finally:
        Path(tmp).unlink(missing_ok=True)


def holder(path: Path) -> dict | None:
    """The record of the lock at `path` ({} where torn or junk), None where there is none."""
    raw = _read_lock(path)
    return None if raw is None else _parse_lock(raw)


def _read_lock(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _parse_lock(raw: bytes | None) -> dict:
    try:
        holder = json.loads(raw)
        return holder if isinstance(holder, dict) else {}
    except (TypeError, ValueError):
        return {}  # gone, torn or junk: judged by its age alone


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22): with the pid it names one
    process, since pids are reused. None where /proc does not say (not Linux, no such process)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _stale_reason(holder: dict, path: Path, stale_after_s: float) -> str | None:
    """Why a lock's holder is gone (None: it may be alive)."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if holder["pid"] == os.getpid():
            return "held by this very process (an earlier run in it ended without releasing)"
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return "its process no longer exists"
        except PermissionError:
            pass
        started = _process_start(holder["pid"])
        if holder.get("pid_start") is not None and started is not None and started != holder["pid_start"]:
            return "its pid now belongs to another process (the holder is gone)"
        return None  # alive on this host (another user's process, or ours)
    if holder.get("slurm_job") is not None and holder.get("slurm_job") == slurm_job():
        return "it belongs to an earlier allocation of this SLURM job (requeued)"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was just released"
    if age > stale_after_s:
        return f"not refreshed for {age:.0f} s (train.lock_stale_s={stale_after_s:g})"
    return None


class _Heartbeat:
    """A daemon thread that refreshes the lock's time stamp every `interval_s` while its holder lives, whatever
    the run does (a long compile, evaluation or log_every): only a dead holder's lock goes stale."""

    def __init__(self, path: Path, token: str, interval_s: float):
        self.path, self.token, self.interval_s = path, token, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"run.lock heartbeat {path}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            holder = _parse_lock(_read_lock(self.path))
            if holder.get("token") != self.token:  # removed, or taken over (we were frozen past lock_stale_s)
                who = f"now held by {holder.get('host')} pid {holder.get('pid')}" if holder else "removed"
                warnings.warn(f"{self.path} is no longer this process's lock ({who}): another launch may write "
                              f"this run directory too", stacklevel=1)
                return
            with contextlib.suppress(OSError):  # a failed refresh is retried at the next beat
                os.utime(self.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

