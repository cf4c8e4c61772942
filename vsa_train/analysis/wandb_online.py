"""Online wandb runs through wandb's public API (`wandb.Api()`): `wandb:<entity>/<project>[/<group>]`.

Offline wandb runs are not parsed (their transaction log is wandb's private format): analyse their run
directories, whose metrics.jsonl holds the same rows. Of the several wandb runs one run directory can have (one
per launch: vsa_train/metrics.py), the newest holds the whole history and is the one read.
"""
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

from .runs import Run, run_from

_SEGMENT_ID = re.compile(r"-r(\d+)(?:-b(\d+))?$|-b(\d+)$")


def segment_order(run_id: str) -> tuple[int, int]:
    """(launch, rollback) of a wandb run id written by the trainer: `<id>`, `<id>-r<k>`, `<id>[-r<k>]-b<n>`."""
    m = _SEGMENT_ID.search(run_id)
    if not m:
        return 0, 0
    launch, rollback, rollback_only = m.groups()
    return int(launch or 0), int(rollback or rollback_only or 0)


def read_wandb_online(path: str, api=None) -> list[Run]:
    """Runs of `entity/project[/group]` through wandb's public API, the newest segment of each run directory."""
    parts = path.strip("/").split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"wandb runs are named wandb:<entity>/<project>[/<group>], got wandb:{path}")
    if api is None:
        import wandb

        api = wandb.Api()
    filters = {"group": parts[2]} if len(parts) == 3 else None
    newest = {}
    for remote in api.runs("/".join(parts[:2]), filters=filters):
        config = dict(remote.config)
        owner = str(config.get("run_dir") or remote.name)
        if owner not in newest or segment_order(remote.id) > segment_order(newest[owner].id):
            newest[owner] = remote
    runs = []
    for owner, remote in sorted(newest.items()):
        rows = [{k: v for k, v in row.items() if not k.startswith("_") and v is not None}
                for row in remote.scan_history()]
        rows = [r for r in rows if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)
                and isinstance(r.get("flops"), (int, float)) and not math.isnan(r["flops"])]
        runs.append(run_from(Path(owner), OmegaConf.create(dict(remote.config)), rows))
    return runs
