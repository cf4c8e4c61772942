"""Metric rows: run_dir/metrics.jsonl (always) and the accelerate trackers (wandb), with FLOPs as the x-axis.

A row counts once its newline is on disk: each row is written with one write of the whole line, so a crash
(SIGKILL, full disk) leaves at most one torn last line, which readers drop. Readers skip any other bad line
(not UTF-8, not JSON, not an object with an integer `step`) with a MetricsWarning naming the file and line.

wandb mirrors metrics.jsonl, one wandb run per *segment* of the history. metrics.jsonl is rewound to the
checkpoint a launch resumes from (or a rollback reloads), and the rows after it are re-run; wandb cannot drop
rows it has (offline runs cannot be rewound at all, and `resume_from` rewinding is a server feature), so each
launch writes a new wandb run `<id>-r<launch>` (`<id>` derived from the run directory; the first launch is plain
`<id>`) of the same group, and a rollback within a launch a new `...-b<n>`. A new segment first re-logs the rows
metrics.jsonl kept, then continues: the newest segment of a run holds its whole history and nothing of a
crashed launch past the checkpoint. Older segments are superseded attempts; `vsa_train.analysis` reads only the
newest segment of each run directory (wandb config `run_dir`), and metrics.jsonl is always the record.
"""
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

from accelerate import Accelerator

from .files import atomic_write, naming_free_space

# A run stops at the first step that reaches train.flops_budget, so its last step crosses the budget; a study holds
# its runs to at most this overshoot (the grid runner refuses a record past it, the analysis flags one, and runs of
# one budget count as one point of the loss-vs-FLOPs frontier within it).
BUDGET_OVERSHOOT = 0.02


class MetricsWarning(UserWarning):
    """A line of a metrics file that is not a row (torn by a crash, or junk) and was skipped."""


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops rows newer than the checkpoint resumed from.

    With a wandb tracker, the rows kept are re-logged into a fresh wandb segment (see the module docstring)."""

    def __init__(self, path, accelerator: Accelerator, resume_step: int):
        self.path, self.accelerator = Path(path), accelerator
        if accelerator.is_main_process:
            # rows logged after the last checkpoint belong to steps that will be re-run (same data, same RNG);
            # a fresh run passes -1 and so starts from an empty file
            rewind(self.path, resume_step)
            tracker = _wandb_tracker(accelerator)
            if tracker is not None:
                _wandb_segment(tracker, read_metrics(self.path) if self.path.exists() else [])

    def log(self, row: dict) -> None:
        """Writes one row (it must hold `step`) to metrics.jsonl and to the trackers."""
        if self.accelerator.is_main_process:
            _append(self.path, (json.dumps(row) + "\n").encode())
        self.accelerator.log(row, step=row["step"])


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl file, in file order; torn or junk lines are skipped with a MetricsWarning."""
    path = Path(path)
    return [row for _, row in _parse(path, path.read_bytes())]


def rewind(path, step: int) -> None:
    """Atomically keeps only the rows of a metrics file with step <= `step` (bad lines go too, with a warning)."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    kept = b"".join(line + b"\n" for line, row in _parse(path, data) if row["step"] <= step)
    if kept != data:
        atomic_write(path, kept)


def _parse(path: Path, data: bytes) -> list[tuple[bytes, dict]]:
    """(line, row) for each good line of a metrics file's bytes; each bad one is skipped with a MetricsWarning."""
    *lines, torn = data.split(b"\n")  # torn is b"" when the file ends with a newline, as a complete file does
    good = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            good.append((line, _row(line)))
        except ValueError as err:
            _warn(path, number, f"skipped a bad line ({err})", line)
    if torn.strip():
        _warn(path, len(lines) + 1, "dropped the torn last line (no newline: its write was cut short)", torn)
    return good


def _row(line: bytes) -> dict:
    """One line as a row; ValueError saying why when it is not one."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err.reason} at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise ValueError("not JSON: nested too deeply") from None
    if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not an object")
    if type(row.get("step")) is not int:  # bool is an int subclass; True is no step
        raise ValueError(f"no integer 'step' (got {row.get('step')!r})")
    return row


def _warn(path: Path, number: int, what: str, line: bytes) -> None:
    warnings.warn(f"{path}:{number}: {what}: {line[:80]!r}", MetricsWarning, stacklevel=4)


def _append(path: Path, line: bytes) -> None:
    """Appends one whole line with a single write and flushes it, so a crash can tear only this line."""
    with naming_free_space(path), open(path, "ab") as f:
        f.write(line)
        f.flush()


def define_flops_axis(accelerator: Accelerator) -> None:
    """Makes cumulative executed FLOPs the x-axis of every wandb chart (docs/design.md, 'Metrics')."""
    tracker = _wandb_tracker(accelerator)
    if tracker is not None:
        _define_metrics(tracker.run)


def _define_metrics(run) -> None:
    """Every key (a glob, so keys added later are included) against `flops`; the summary keeps eval minima."""
    run.define_metric("flops")
    run.define_metric("*", step_metric="flops")
    for key in ("eval/loss", "eval/loss_ema"):
        run.define_metric(key, step_metric="flops", summary="min")


# ------------------------------------------------------------------------------------------------------ wandb

def wandb_project(cfg) -> str:
    """WANDB_PROJECT if set, else logger.project (the config supplies the default only)."""
    return os.environ.get("WANDB_PROJECT") or getattr(cfg.logger, "project", None) or "vsa_train"


def wandb_init_kwargs(cfg, run_dir, overrides: list[str] | None = None, exclude_keys=()) -> dict:
    """wandb.init arguments (except project) for the run in `run_dir`.

    group: logger.group, else the sweep (`<exp_name>_<data.name>`, the multirun directory's name); job_type:
    logger.job_type ("train"); name and tags from the task overrides that choose this run (`overrides`, default
    Hydra's `overrides.task` minus `exclude_keys` and `experiment`; without Hydra, the run directory's name); id:
    one per launch (`<id>`, then `<id>-r<launch>`, from config_history.jsonl's launch count); mode and entity:
    WANDB_MODE / WANDB_ENTITY if set, else logger.mode / logger.entity.
    """
    run_dir = Path(run_dir)
    logger = cfg.logger
    if overrides is None:
        overrides, exclude_keys = _hydra_task_overrides()
    chosen = [o for o in overrides if _override_key(o) not in {"experiment", *exclude_keys}]
    name = " ".join(_short(o) for o in chosen) or run_dir.name
    tags = list(dict.fromkeys([*(o[:64] for o in chosen), *(str(t) for t in getattr(logger, "tags", None) or [])]))
    base = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    launch = _launches(run_dir) - 1
    return {"id": base if launch <= 0 else f"{base}-r{launch}", "name": name, "resume": "allow",
            "group": getattr(logger, "group", None) or f"{cfg.exp_name}_{cfg.data.name}",
            "job_type": getattr(logger, "job_type", None) or "train", "tags": tags, "dir": str(run_dir),
            "mode": os.environ.get("WANDB_MODE") or getattr(logger, "mode", None),
            "entity": os.environ.get("WANDB_ENTITY") or getattr(logger, "entity", None)}


def _hydra_task_overrides() -> tuple[list[str], list[str]]:
    """(task overrides, override_dirname.exclude_keys) of the running Hydra job; ([], []) outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except (ImportError, ValueError):
        return [], []
    return list(hydra.overrides.task), list(hydra.job.config.override_dirname.exclude_keys)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _short(override: str) -> str:
    """`attn=dense` -> `dense`, `train.flops_budget=1e18` -> `flops_budget=1e18`."""
    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    return value if "." not in key else f"{key.rsplit('.', 1)[1]}={value}"


def _launches(run_dir: Path) -> int:
    """Launches recorded in run_dir/config_history.jsonl (one line each, this launch included)."""
    try:
        return sum(1 for line in (run_dir / "config_history.jsonl").read_bytes().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def _wandb_tracker(accelerator: Accelerator):
    """accelerate's wandb tracker on the main process (its `.run` is the wandb run), else None."""
    if not accelerator.is_main_process:
        return None
    trackers = getattr(accelerator, "trackers", ())  # (a stand-in accelerator may have none)
    return next((t for t in trackers if t.name == "wandb" and getattr(t, "run", None)), None)


_SEGMENT = re.compile(r"-b(\d+)$")


def _wandb_segment(tracker, rows: list[dict]) -> None:
    """Makes the tracker's wandb run a segment holding exactly `rows` (metrics.jsonl after its rewind).

    The first call of a launch finds the run the launch started (nothing logged yet) and re-logs the kept rows
    into it; a later call (a rollback rewound the file) finishes that run and starts `<id>-b<n>` first."""
    import wandb

    run = tracker.run
    if getattr(tracker, "_vsa_segment_used", False):
        old_id, config = run.id, run.config.as_dict()
        n = int(m.group(1)) + 1 if (m := _SEGMENT.search(old_id)) else 1
        new_id = _SEGMENT.sub("", old_id) + f"-b{n}"
        run.finish()
        kwargs = {**tracker.init_kwargs, "id": new_id}
        run = tracker.run = wandb.init(project=tracker.run_name, config=config, **kwargs)
        _define_metrics(run)
    tracker._vsa_segment_used = True
    for row in rows:
        run.log(row, step=row["step"])
