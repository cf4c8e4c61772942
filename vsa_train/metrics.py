"""Metric rows: run_dir/metrics.jsonl (always) and the accelerate trackers (wandb), with FLOPs as the x-axis."""
import json
from pathlib import Path

from accelerate import Accelerator


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops rows newer than the checkpoint resumed from."""

    def __init__(self, path, accelerator: Accelerator, resume_step: int):
        self.path, self.accelerator = Path(path), accelerator
        if accelerator.is_main_process:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        # rows logged after the last checkpoint belong to steps that will be re-run (same data, same RNG)
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in rows))

    def log(self, row: dict) -> None:
        """Writes one row (it must hold `step`) to metrics.jsonl and to the trackers."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log(row, step=row["step"])


def read_metrics(path) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def define_flops_axis(accelerator: Accelerator) -> None:
    """Makes cumulative executed FLOPs the x-axis of every wandb chart (DESIGN.md §5)."""
    if not any(t.name == "wandb" for t in accelerator.trackers):
        return
    run = accelerator.get_tracker("wandb", unwrap=True)
    run.define_metric("flops")
    for pattern in ("train/*", "eval/*", "flops_dense", "lr", "grad_norm", "samples/s", "tokens/s", "TFLOP/s",
                    "MFU"):
        run.define_metric(pattern, step_metric="flops")
