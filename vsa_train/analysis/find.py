"""Finding runs: every run directory under the given folders, or the runs of an online wandb project."""
from pathlib import Path

from .runs import Run, from_metrics
from .wandb_online import read_wandb_online


def find_runs(paths, notes: list | None = None) -> list[Run]:
    """Every run under the given paths (run or sweep directories, `wandb:entity/project[/group]`), by path."""
    # A directory that cannot be read as a run raises, or, given `notes`, is skipped with one line there: a messy
    # runs/ folder still gets analysed.
    runs = {}
    for spec in map(str, paths):
        if spec.startswith("wandb:"):
            for run in read_wandb_online(spec[len("wandb:"):]):
                runs[run.path] = run
            continue
        root = Path(spec)
        if not root.exists():
            raise FileNotFoundError(f"no such run directory: {root}")
        for metrics in sorted(root.rglob("metrics.jsonl")):
            try:
                runs[metrics.parent.resolve()] = from_metrics(metrics)
            except (FileNotFoundError, ValueError, OSError) as err:
                if notes is None:
                    raise
                notes.append(f"{metrics.parent}: not read ({err})")
    if not runs:
        raise FileNotFoundError(f"no runs (metrics.jsonl) under {list(paths)}")
    return [runs[k] for k in sorted(runs, key=str)]
