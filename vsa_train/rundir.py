"""The run directory contract. One module owns every file a run leaves behind:

    run_dir/
      config.yaml             the resolved config the run started with; kept (a forced resume replaces it)
      config_history.jsonl    one line per launch: host, processes, global batch, keys that differ, forced or not
      run.lock                the one writer: host, pid, SLURM job; refreshed while the run lives
      metrics.jsonl           one row per logged step (vsa_train/metrics.py)
      checkpoints/step_<N>/   model.safetensors, ema.safetensors, optimizer.safetensors + optimizer.json,
                              state.json (counters and loss health), rng_rank<r>.safetensors,
                              manifest.json (sizes and checksums of the others; written last)

Nothing here is ever unpickled: tensors are safetensors, everything else JSON or YAML. A checkpoint is written
to `.tmp-step_<N>`, then renamed; it counts only if its manifest verifies, so resume takes the newest one that
does and names the ones it skips. This module does files only (no collectives): the trainer calls it on the
ranks that must write and agrees across ranks around it.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from .files import atomic_write, disk_error, fsync_dir, fsync_tree

CONFIG = "config.yaml"
HISTORY = "config_history.jsonl"
LOCK = "run.lock"
MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT = 2  # checkpoint layout version, in every manifest (2: checksums of 64 MiB blocks, hashed in parallel)
READS = (1, 2)  # the formats this version loads
BLOCK_BYTES = 64 << 20
_READ_BYTES = 16 << 20
_HASH_THREADS = min(8, os.cpu_count() or 1)

# Config sections that decide the training trajectory; a resume must match them (train.resume=force overrides).
TRAJECTORY = ("model", "attn", "data", "optim", "train.seed", "train.ema", "train.mixed_precision")
# Keys inside those sections that do not change what is trained (speed or memory only).
NOT_TRAJECTORY = ("data.num_workers", "model.grad_checkpointing")  # parallel.* is outside TRAJECTORY too
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_RNG_FILE = re.compile(r"^rng_rank\d+\.safetensors$")


class RunDirError(RuntimeError):
    """A launch that the run directory refuses (mismatching config, a live writer, no usable checkpoint)."""


# ------------------------------------------------------------------------------------------------ the config

def load_run_config(run_dir) -> DictConfig:
    """The config a run trained with: run_dir/config.yaml (written by the trainer), else Hydra's record."""
    run_dir = Path(run_dir)
    for path in (run_dir / CONFIG, run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return OmegaConf.load(path)
    raise FileNotFoundError(f"{run_dir} holds no {CONFIG} or .hydra/config.yaml: is it a run directory?")


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def trajectory_diff(old: DictConfig, new: DictConfig) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every trajectory key that differs (missing keys count as None)."""
    def pick(cfg):
        flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
        return {k: v for k, v in flat.items()
                if any(k == t or k.startswith(t + ".") for t in TRAJECTORY)
                and not any(k == n or k.startswith(n + ".") for n in NOT_TRAJECTORY)}
    a, b = pick(old), pick(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


# --------------------------------------------------------------------------------------------- the directory

@dataclass
class Launch:
    """What a launch is: its config, how many processes, its global batch and the resume mode."""

    cfg: DictConfig
    processes: int
    global_batch: int
    resume: str  # auto | never | force
    data_parallel: int = 1  # processes / parallel.sp_size


class RunDir:
    """A run directory: paths, the kept config, launch checks, checkpoints."""

    def __init__(self, path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    # -- launching

    def check_launch(self, launch: Launch) -> "Path | None":
        """Read-only: refuses a launch that does not fit the run (RunDirError), returns the checkpoint to resume.

        auto: resume the newest verified checkpoint if the trajectory keys and global batch match; never: the
        directory must hold no checkpoint; force: resume whatever differs (recorded by `record_launch`).
        """
        if launch.resume not in ("auto", "never", "force"):
            raise ValueError(f"train.resume must be auto, never or force, got {launch.resume!r}")
        has_checkpoints = bool(self.checkpoint_dirs())
        if launch.resume == "never":
            if has_checkpoints:
                raise RunDirError(f"train.resume=never, but {self.checkpoints} holds checkpoints; choose another "
                                  f"run_dir or delete them")
            return None
        if launch.resume == "auto" and (self.path / CONFIG).is_file():
            diff = trajectory_diff(OmegaConf.load(self.path / CONFIG), launch.cfg)
            if diff:
                raise RunDirError(
                    f"{self.path} belongs to a run with another config; refusing to resume it with:\n"
                    + "\n".join(f"  {k}: run has {a!r}, this launch {b!r}" for k, a, b in diff)
                    + "\nUse another run_dir (exp_name=... or hydra.run.dir=...), or train.resume=force to resume "
                      "anyway (recorded in config_history.jsonl).")
        ckpt = self.resume_checkpoint() if has_checkpoints else None
        if ckpt is not None and launch.resume == "auto":
            saved = read_state(ckpt).get("global_batch")
            if saved is not None and saved != launch.global_batch:
                raise RunDirError(
                    f"{ckpt} was trained with global batch {saved}; this launch has {launch.global_batch} "
                    f"(train.batch_size={launch.cfg.train.batch_size} x train.grad_accum="
                    f"{launch.cfg.train.grad_accum} x {launch.data_parallel} data-parallel ranks). Keep the global "
                    f"batch (e.g. batch_size x grad_accum = {saved / launch.data_parallel:g} per data-parallel rank), "
                    f"or train.resume=force.")
        return ckpt

    def record_launch(self, launch: Launch, resumed_from: "Path | None") -> None:
        """Writes config.yaml on a run's first launch (or a forced one) and appends the launch to the history."""
        self.path.mkdir(parents=True, exist_ok=True)
        config = self.path / CONFIG
        diff = trajectory_diff(OmegaConf.load(config), launch.cfg) if config.is_file() else []
        if not config.is_file() or (launch.resume == "force" and diff):
            atomic_write(config, OmegaConf.to_yaml(launch.cfg, resolve=True))
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
                 "slurm_job": _slurm_job(), "processes": launch.processes, "global_batch": launch.global_batch,
                 "resume": launch.resume, "resumed_from": resumed_from and resumed_from.name,
                 "changed": {k: [a, b] for k, a, b in diff}, "forced": bool(diff)}
        try:
            with open(self.path / HISTORY, "a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        except OSError as err:
            raise disk_error(err, self.path / HISTORY) from err

    # -- the lock

    @contextlib.contextmanager
    def lock(self, stale_after_s: float):
        """Holds run.lock for the block: one writer per run directory.

        A lock is stale (taken over with a warning) when its process is gone on this host, when it belongs to an
        earlier allocation of this SLURM job (a requeue), or when its holder has not refreshed it for
        `stale_after_s` seconds (another host that died). Otherwise the launch is refused, naming the holder.
        """
        path = self.path / LOCK
        self.path.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": _slurm_job(), "started": time.time()}
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                reason = _stale_reason(holder, path, stale_after_s)
                if reason is None:
                    raise RunDirError(f"{self.path} is in use by {holder.get('host')} pid {holder.get('pid')} "
                                      f"(SLURM job {holder.get('slurm_job')}; {path}). One writer per run "
                                      f"directory: wait for it, or delete {path} if that process is gone.") from None
                warnings.warn(f"taking over the stale lock {path} of {holder.get('host')} pid {holder.get('pid')}: "
                              f"{reason}", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            break
        try:
            yield
        finally:
            if _lock_holder(path).get("pid") == me["pid"]:
                path.unlink(missing_ok=True)

    def touch_lock(self) -> None:
        """Refreshes the lock's time stamp (a live holder is never taken for stale)."""
        with contextlib.suppress(OSError):
            os.utime(self.path / LOCK)

    # -- checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        """Renamed (complete or damaged) checkpoint directories, oldest first; `.tmp-*` ones are not listed."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def newest_verified(self, warn: bool = True):
        """Checkpoints whose manifest verifies, newest first, hashed one at a time as the caller asks for them (a
        resume hashes only the newest good one); each one that does not verify is named in a warning."""
        for ckpt in reversed(self.checkpoint_dirs()):
            problem = verify(ckpt)
            if problem is None:
                yield ckpt
            elif warn:
                warnings.warn(f"skipping checkpoint {ckpt}: {problem}", stacklevel=2)

    def verified_checkpoints(self, warn: bool = True) -> list[Path]:
        """Every checkpoint whose manifest verifies, oldest first."""
        return list(reversed(list(self.newest_verified(warn))))

    def resume_checkpoint(self) -> "Path | None":
        """The newest verified checkpoint; RunDirError if checkpoints exist but none verifies."""
        if not self.checkpoint_dirs():
            return None
        newest = next(self.newest_verified(), None)
        if newest is None:
            raise RunDirError(f"no checkpoint under {self.checkpoints} verifies (see the warnings above); refusing "
                              f"to start the run over. Move them away to start fresh.")
        return newest

    def last_healthy(self, check: bool = True) -> "Path | None":
        """The newest checkpoint saved while the loss was healthy (finite, not exploding); `check`: verified."""
        for ckpt in self.newest_verified() if check else reversed(self.checkpoint_dirs()):
            try:
                if read_state(ckpt).get("healthy"):
                    return ckpt
            except (OSError, ValueError):
                continue
        return None

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def tmp_dir(self, step: int) -> Path:
        return self.checkpoints / f".tmp-step_{step:08d}"

    def publish(self, step: int, keep: int) -> Path:
        """Seals `.tmp-step_<step>` (manifest last, fsync, rename) and keeps the newest `keep` checkpoints."""
        tmp, final = self.tmp_dir(step), self.step_dir(step)
        try:
            write_manifest(tmp, step)
            fsync_tree(tmp)
            if final.exists():  # a damaged copy of this step (its manifest did not verify): replaced
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.checkpoints)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(err, tmp) from err
        healthy = self.last_healthy(check=False)
        for old in self.checkpoint_dirs()[:-keep]:
            if old != healthy:  # a rollback needs one checkpoint saved while the loss was healthy
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoints.glob(".tmp-*"):  # left by an earlier crash mid-save
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        return final


def resolve_checkpoint(path) -> tuple[Path, Path]:
    """(run_dir, checkpoint dir) from a run directory (its newest verified checkpoint) or a checkpoint directory."""
    path = Path(path)
    if (path / MANIFEST).is_file() or _STEP_DIR.match(path.name):
        problem = verify(path)
        if problem is not None:
            raise RunDirError(f"checkpoint {path} is not usable: {problem}")
        return path.parent.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a run directory nor a checkpoint directory")
    ckpt = RunDir(path).resume_checkpoint()
    if ckpt is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (looked in {path / 'checkpoints'})")
    return path, ckpt


# ------------------------------------------------------------------------------------------ checkpoint files

def save_tensors(tensors: dict, path: Path) -> None:
    """One safetensors file (CPU, contiguous copies: views of shared storage cannot be stored)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict:
    """A safetensors file's tensors; a file that is not one is a RunDirError naming it (never unpickled)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types for bad headers)
        raise RunDirError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None


def write_json(obj: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, allow_nan=True))


def read_state(ckpt: Path) -> dict:
    """The counters and health record of a checkpoint (state.json)."""
    return read_json(Path(ckpt) / STATE)


def read_json(path: Path) -> dict:
    value = json.loads(Path(path).read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def optimizer_to_files(state: dict, ckpt: Path) -> None:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's portable form) as
    optimizer.safetensors (tensors, "<param>/<key>") + optimizer.json (numbers and param groups)."""
    tensors, scalars = {}, {}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"{name}/{key}"] = value
    save_tensors(tensors, ckpt / "optimizer.safetensors")
    write_json({"param_groups": state["param_groups"], "scalars": scalars}, ckpt / "optimizer.json")


def optimizer_from_files(ckpt: Path) -> dict:
    """The optimizer state dict that `optimizer_to_files` wrote (no unpickling: safetensors and JSON)."""
    meta = read_json(ckpt / "optimizer.json")
    state: dict[str, dict] = {}
    for name, value in [*load_tensors(ckpt / "optimizer.safetensors").items(), *meta["scalars"].items()]:
        param, key = name.rsplit("/", 1)
        state.setdefault(param, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rng_rank{rank}.safetensors"


def rng_problem(ckpt: Path, rank: int) -> str | None:
    """Why rank `rank`'s RNG file cannot be trusted (missing, or not the bytes the manifest recorded), else None."""
    path = rng_file(ckpt, rank)
    manifest = read_json(Path(ckpt) / MANIFEST)
    entry = manifest["files"].get(path.name)
    if not isinstance(entry, dict) or not path.is_file():
        return f"{path.name} is missing"
    return None if _entry_problem(path, entry, manifest) is None else f"{path.name} does not match the manifest"


def rng_state() -> dict:
    """This process's torch RNG states (CPU and, where present, the current CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -------------------------------------------------------------------------------------------------- manifest

def digest(path: Path, block_bytes: int = BLOCK_BYTES) -> str:
    """SHA-256 of the SHA-256s of the file's `block_bytes` blocks: a checksum hashed by several threads at once
    (hashlib releases the GIL), since one SHA-256 stream runs at ~1.5 GB/s and dit_1b's checkpoint is 17.5 GB.
    Each thread reads its block 16 MiB at a time, so memory stays small whatever block size a manifest names."""
    size = Path(path).stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        def block(start: int) -> bytes:
            h, at, end = hashlib.sha256(), start, min(start + block_bytes, size)
            while at < end:
                chunk = os.pread(fd, min(_READ_BYTES, end - at), at)
                if not chunk:  # the file shrank while being read: the checksum cannot match
                    break
                h.update(chunk)
                at += len(chunk)  # a short read (network file systems) goes on where it stopped
            return h.digest()

        with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
            blocks = b"".join(pool.map(block, range(0, size, block_bytes)))
    finally:
        os.close(fd)
    return hashlib.sha256(blocks).hexdigest()


def _block_bytes(manifest: dict) -> int | None:
    """A format-2 manifest's block size if it is one this version hashes with (64 KiB to 1 GiB), else None."""
    block = manifest.get("block_bytes")
    ok = isinstance(block, int) and not isinstance(block, bool) and 1 << 16 <= block <= 1 << 30
    return block if ok else None


def _whole_file_sha256(path: Path) -> str:
    """Format 1's checksum (checkpoints of earlier versions): one SHA-256 of the file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _entry_problem(path: Path, entry: dict, manifest: dict) -> str | None:
    """Why `path` is not the file its manifest entry describes (size, then checksum), else None."""
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"{path.name} has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
    if manifest.get("format") == 1:
        ok = _whole_file_sha256(path) == entry.get("sha256")
    else:
        block = _block_bytes(manifest)
        ok = block is not None and digest(path, block) == entry.get("blocks_sha256")
    return None if ok else f"{path.name} does not match its checksum"


def write_manifest(ckpt: Path, step: int) -> None:
    """manifest.json: format, step and the size and checksum (`digest`) of every other file; written last."""
    paths = [p for p in sorted(Path(ckpt).iterdir()) if p.is_file() and p.name != MANIFEST]
    files = {p.name: {"bytes": p.stat().st_size, "blocks_sha256": digest(p)} for p in paths}
    write_json({"format": FORMAT, "step": step, "block_bytes": BLOCK_BYTES, "files": files}, Path(ckpt) / MANIFEST)


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    ckpt = Path(ckpt)
    try:
        manifest = read_json(ckpt / MANIFEST)
    except FileNotFoundError:
        if (ckpt / "model.safetensors").is_file() and any(ckpt.glob("*.pkl")):
            return "written by an earlier vsa_train (accelerate pickles); not loaded, nothing is unpickled"
        return f"no {MANIFEST} (incomplete)"
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested beyond the parser's depth
        return f"unreadable {MANIFEST}: {type(err).__name__}: {err}"
    if manifest.get("format") not in READS or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} has format {manifest.get('format')!r}, this vsa_train reads {' or '.join(map(str, READS))}"
    if manifest["format"] != 1 and _block_bytes(manifest) is None:
        return f"{MANIFEST} has block_bytes {manifest.get('block_bytes')!r}, not a block size between 64 KiB and 1 GiB"
    for name in ("model.safetensors", STATE):
        if name not in manifest["files"]:
            return f"{MANIFEST} lists no {name}"
    for name, entry in manifest["files"].items():
        if Path(name).name != name:
            return f"{MANIFEST} names a file outside the checkpoint: {name!r}"
        if _RNG_FILE.match(name):  # optional: without it the resume goes on, reseeded (checked when loaded)
            continue
        if not isinstance(entry, dict):
            return f"{MANIFEST} has no size and checksum for {name}"
        problem = _entry_problem(ckpt / name, entry, manifest)
        if problem is not None:
            return problem
    return None


# ------------------------------------------------------------------------------------------------ lock helpers

def _slurm_job() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # torn or unreadable: judged by its age alone


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
        return None  # alive on this host (another user's process, or ours)
    if holder.get("slurm_job") is not None and holder.get("slurm_job") == _slurm_job():
        return "it belongs to an earlier allocation of this SLURM job (requeued)"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was just released"
    if age > stale_after_s:
        return f"not refreshed for {age:.0f} s (train.lock_stale_s={stale_after_s:g})"
    return None


__all__ = ["CONFIG", "Launch", "RunDir", "RunDirError", "load_run_config", "resolve_checkpoint",
           "trajectory_diff", "verify"]
