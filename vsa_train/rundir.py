"""The run directory: its paths, the launch record and checks, and the lock.

    run_dir/
      config.yaml             the resolved config the run started with; kept (a forced resume replaces it)
      config_history.jsonl    one line per launch: host, processes, global batch, what it changed or kept, forced or not
      .hydra/                 Hydra's record of the launch (config, hydra, overrides), written once it is accepted
      run.lock                the one writer: host, pid, SLURM job; refreshed while the run lives
      metrics.jsonl           one row per logged step (vsa_train/metrics.py)
      checkpoints/step_<N>/   the checkpoints (vsa_train/checkpoint/: format, listing, saving, loading)

Nothing here is ever unpickled: everything is JSON or YAML. A launch resumes the newest checkpoint that verifies
and names the ones it skips. A launch it refuses leaves the directory byte-identical. This module does files only
(no collectives): the trainer calls it on the ranks that must write and agrees across ranks around it.
"""
import contextlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .checkpoint.format import read_state
from .checkpoint.store import Checkpoints
from .files import atomic_write, disk_error

CONFIG = "config.yaml"
HISTORY = "config_history.jsonl"
LOCK = "run.lock"
# Config sections that decide the training trajectory; a resume must match them (train.resume=force overrides).
TRAJECTORY = ("model", "attn", "data", "optim", "train.seed", "train.ema", "train.mixed_precision")
# Keys inside those sections that do not change what is trained (speed or memory only).
NOT_TRAJECTORY = ("data.num_workers", "model.grad_checkpointing")  # parallel.* is outside TRAJECTORY too
# The eval set (vsa_train/evaluation.py; with the data section): one run's eval curve is measured on one set.
EVAL_SET = ("train.eval_samples", "train.eval_timesteps")
# What a resume must match besides the trajectory: the eval set, and the weights the run started from (a resumed
# run keeps its own, so another train.init_from would be ignored).
FIXED = (*TRAJECTORY, *EVAL_SET, "train.init_from")
# Why a key outside the trajectory is fixed, for the refusal's lines.
WHY_FIXED = {**dict.fromkeys(EVAL_SET, "it decides the eval set: the run's eval curve would mix two sets"),
             "train.init_from": "a resumed run keeps its own weights: this one would be ignored"}
HYDRA_RECORD = ".hydra"  # configs/train.yaml sets hydra.output_subdir to null: `record_launch` writes it


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


def config_diff(old: DictConfig, new: DictConfig) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every FIXED key that differs (missing keys count as None)."""
    def pick(cfg):
        flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
        return {k: v for k, v in flat.items()
                if any(k == t or k.startswith(t + ".") for t in FIXED)
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
    resume: str  # train.resume: auto | never | force (sections.RESUME_MODES)
    data_parallel: int = 1  # processes / parallel.sp_size
    lr_end_step: int | None = None  # where the configured learning-rate decay ends (None: it does not decay)


class RunDir:
    """A run directory: paths, the kept config, launch checks, the lock."""

    def __init__(self, path):
        self.path = Path(path)
        self.checkpoints = Checkpoints(self.path / "checkpoints")
        self.metrics = self.path / "metrics.jsonl"

    # -- launching

    def check_launch(self, launch: Launch) -> "Path | None":
        """Read-only: refuses a launch that does not fit the run (RunDirError), returns the checkpoint to resume.

        auto: resume the newest verified checkpoint if the FIXED keys and global batch match; never: the
        directory must hold no checkpoint; force: resume whatever differs (recorded by `record_launch`).
        """
        if launch.resume == "never":
            if self.checkpoints.dirs():
                raise RunDirError(f"train.resume=never, but {self.checkpoints.path} holds checkpoints; choose another "
                                  f"run_dir or delete them")
            return None
        diff = self._config_changes(launch)
        if launch.resume == "auto" and diff:
            raise RunDirError(
                f"{self.path} belongs to a run with another config; refusing to resume it with:\n"
                + "\n".join(f"  {k}: run has {a!r}, this launch {b!r}" + _why(k) for k, a, b in diff)
                + "\nUse another run_dir (exp_name=... or hydra.run.dir=...), or train.resume=force to resume "
                  "anyway (recorded in config_history.jsonl).")
        ckpt = self.checkpoints.resume()
        state = read_state(ckpt) if ckpt is not None else {}
        batch, _ = _state_changes(launch, state)
        if launch.resume == "auto" and batch:
            raise RunDirError(
                f"{ckpt} was trained with global batch {state['global_batch']}; this launch has {launch.global_batch} "
                f"(train.batch_size={launch.cfg.train.batch_size} x train.grad_accum="
                f"{launch.cfg.train.grad_accum} x {launch.data_parallel} data-parallel ranks). Keep the global "
                f"batch (e.g. batch_size x grad_accum = {state['global_batch'] / launch.data_parallel:g} per "
                f"data-parallel rank), or train.resume=force.")
        if ckpt is not None:
            _check_position(ckpt, state, launch)
        return ckpt

    def record_launch(self, launch: Launch, resumed_from: "Path | None") -> None:
        """Writes config.yaml on a run's first launch (or one that changed it), Hydra's record, and appends the
        launch to the history: what it changed (forced, or a fresh start under never) and what the run kept."""
        self.path.mkdir(parents=True, exist_ok=True)
        batch, ends = _state_changes(launch, read_state(resumed_from) if resumed_from is not None else {})
        forced = launch.resume == "force"
        changed = self._config_changes(launch) + batch + (ends if forced else [])  # auto got here with none
        kept = [] if forced else ends  # auto: the run's learning-rate decay goes on to its own end
        if not (self.path / CONFIG).is_file() or changed:
            atomic_write(self.path / CONFIG, OmegaConf.to_yaml(launch.cfg, resolve=True))
        self._record_hydra(launch.cfg)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
                 "slurm_job": _slurm_job(), "processes": launch.processes, "global_batch": launch.global_batch,
                 "resume": launch.resume, "resumed_from": resumed_from and resumed_from.name,
                 "changed": {k: [a, b] for k, a, b in changed}, "kept": {k: [a, b] for k, a, b in kept},
                 "forced": forced and bool(changed)}
        try:
            with open(self.path / HISTORY, "a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        except OSError as err:
            raise disk_error(err, self.path / HISTORY) from err

    def _config_changes(self, launch: Launch) -> list[tuple[str, object, object]]:
        """The FIXED keys this launch changes against the run's config.yaml (none on a first launch)."""
        config = self.path / CONFIG
        return config_diff(OmegaConf.load(config), launch.cfg) if config.is_file() else []

    def _record_hydra(self, cfg: DictConfig) -> None:
        """Under Hydra, its record of this launch (what Hydra writes at job start, before any launch check)."""
        from hydra.core.hydra_config import HydraConfig  # here: only train.py's launches run under Hydra

        if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
            return  # not under Hydra, or Hydra wrote its record itself (hydra.output_subdir set on the command line)
        hydra = HydraConfig.instance().cfg
        folder = Path(hydra.hydra.runtime.output_dir) / HYDRA_RECORD
        folder.mkdir(parents=True, exist_ok=True)
        for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra), ("overrides.yaml", hydra.hydra.overrides.task)):
            atomic_write(folder / name, OmegaConf.to_yaml(node))

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

# ---------------------------------------------------------------------------------------------- launch helpers

def _why(key: str) -> str:
    return f" ({WHY_FIXED[key]})" if key in WHY_FIXED else ""


def _state_changes(launch: Launch, state: dict) -> tuple[list, list]:
    """Against the resumed checkpoint's counters: (its global batch, which auto refuses to change; its learning-rate
    decay's end, which auto keeps), each as [(key, checkpoint's value, this launch's)]."""
    batch = [("global_batch", state["global_batch"], launch.global_batch)] \
        if state.get("global_batch") not in (None, launch.global_batch) else []
    end = [("lr_end_step", state["lr_end_step"], launch.lr_end_step)] \
        if state.get("lr_end_step") not in (None, launch.lr_end_step) else []
    return batch, end


def _check_position(ckpt: Path, state: dict, launch: Launch) -> None:
    """The stream restarts at a whole number of this launch's batches (batch_size x data-parallel ranks), so they
    must divide the data position; a forced global batch may not."""
    position, size, ranks = state.get("position", 0), launch.cfg.train.batch_size, launch.data_parallel
    if position % (size * ranks) == 0:
        return
    fits = next((b for b in range(size, 0, -1) if position % (b * ranks) == 0), None)
    way = (f"train.batch_size={fits} would (the largest up to {size} that does)" if fits else
           f"no train.batch_size does with {ranks} data-parallel ranks")
    raise RunDirError(f"{ckpt} stopped at sample {position}; this launch's batches of {size * ranks} "
                      f"(train.batch_size={size} x {ranks} data-parallel ranks) do not divide it, so the data cannot "
                      f"continue there: {way}")


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


__all__ = ["CONFIG", "Launch", "RunDir", "RunDirError", "config_diff", "load_run_config"]
