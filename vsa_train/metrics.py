"""Metric rows: run_dir/metrics.jsonl (always) and the accelerate trackers (wandb), with FLOPs as the x-axis.

A row counts once its newline is on disk: each row is written with one write of the whole line, so a crash
(SIGKILL, full disk) leaves at most one torn last line, which readers drop. Readers skip any other bad line
(not UTF-8, not JSON, not an object with an integer `step`) with a MetricsWarning naming the file and line.
"""
import json
import warnings
from pathlib import Path

from accelerate import Accelerator

from .files import atomic_write, naming_free_space


class MetricsWarning(UserWarning):
    """A line of a metrics file that is not a row (torn by a crash, or junk) and was skipped."""


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops rows newer than the checkpoint resumed from."""

    def __init__(self, path, accelerator: Accelerator, resume_step: int):
        self.path, self.accelerator = Path(path), accelerator
        if accelerator.is_main_process:
            # rows logged after the last checkpoint belong to steps that will be re-run (same data, same RNG);
            # a fresh run passes -1 and so starts from an empty file
            rewind(self.path, resume_step)

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
    """Makes cumulative executed FLOPs the x-axis of every wandb chart (DESIGN.md §5)."""
    if not any(t.name == "wandb" for t in accelerator.trackers):
        return
    run = accelerator.get_tracker("wandb", unwrap=True)
    run.define_metric("flops")
    for pattern in ("train/*", "eval/*", "flops_dense", "lr", "grad_norm", "samples/s", "tokens/s", "TFLOP/s",
                    "MFU"):
        run.define_metric(pattern, step_metric="flops")
