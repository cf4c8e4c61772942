"""Reading finished (or interrupted) runs: metrics.jsonl with the run's config, or wandb offline runs.

A run is found by either file: `run_dir/metrics.jsonl` (always written by the trainer, read beside the run's
config.yaml or, failing that, Hydra's .hydra/config.yaml) or a wandb offline run directory
`.../wandb/offline-run-*/run-<id>.wandb` (history and config recovered from wandb's transaction log). Where a
run directory holds both, metrics.jsonl is used (it is the source of the wandb rows).
"""
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..metrics import read_metrics
from ..rundir import load_run_config


@dataclass
class Run:
    """One training run: its rows (one dict per logged step) and the config values the analysis groups by."""

    path: Path
    attn: str                # attention type: dense, vsa, ...
    size: str                # model label: name and, where overridden, width x depth
    budget: float | None     # train.flops_budget
    rows: list[dict] = field(repr=False)

    def evals(self) -> list[tuple[float, float]]:
        """(cumulative FLOPs, eval loss) of every eval row after step 0, in order."""
        return [(r["flops"], r["eval/loss"]) for r in self.rows if "eval/loss" in r and r["flops"] > 0]

    @property
    def reached_budget(self) -> bool:
        return self.budget is not None and bool(self.rows) and self.rows[-1]["flops"] >= self.budget


def find_runs(paths) -> list[Run]:
    """Every run under the given paths (run dirs, sweep dirs or wandb offline-run dirs), sorted by path."""
    runs = {}
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such run directory: {root}")
        for metrics in sorted(root.rglob("metrics.jsonl")):
            runs[metrics.parent.resolve()] = _from_metrics(metrics)
        for log in sorted(root.rglob("offline-run-*/run-*.wandb")):
            owner = _wandb_owner(log)
            if owner.resolve() not in runs:  # a run dir with metrics.jsonl is read from that
                runs[owner.resolve()] = _from_wandb(log, owner)
    if not runs:
        raise FileNotFoundError(f"no runs (metrics.jsonl or wandb offline-run-*/run-*.wandb) under {list(paths)}")
    return [runs[k] for k in sorted(runs)]


def _from_metrics(path: Path) -> Run:
    try:
        cfg = load_run_config(path.parent)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} has no run config beside it, so the analysis cannot tell its attention "
                                f"and model ({err}; train.py writes config.yaml into every run directory)") from None
    return _run(path.parent, cfg, read_metrics(path))


def _from_wandb(log: Path, owner: Path) -> Run:
    config, rows = read_wandb_offline(log)
    return _run(owner, OmegaConf.create(config), rows)


_NEEDED = ("model.name", "model.hidden_size", "model.depth", "attn.name")  # what a run is grouped and labelled by


def _run(path: Path, cfg: DictConfig, rows: list[dict]) -> Run:
    # .hydra/config.yaml keeps its interpolations, and some (${hydra:...}) resolve only inside a Hydra app: read
    # each value on its own, an unresolvable one counting as absent, so one odd entry cannot sink the run
    value = {key: OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
             for key in (*_NEEDED, "train.flops_budget")}
    missing = [key for key in _NEEDED if value[key] is None]
    if missing:
        raise ValueError(f"{path}: its config lacks {', '.join(missing)} (model name, width, depth and attn.name "
                         f"are needed)")
    size = f"{value['model.name']} ({value['model.hidden_size']}x{value['model.depth']})"
    return Run(path=path, attn=value["attn.name"], size=size, budget=value["train.flops_budget"],
               rows=sorted(rows, key=lambda r: r["step"]))


def _wandb_owner(log: Path) -> Path:
    """The run directory of a wandb offline run: the parent of its `wandb/` folder (else the offline-run dir)."""
    offline_dir = log.parent
    return offline_dir.parent.parent if offline_dir.parent.name == "wandb" else offline_dir


# wandb's transaction log (.wandb) is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records
# (crc32c: 4, length: 2, type: 1, payload), a payload split over blocks as FIRST/MIDDLE/LAST pieces; each
# payload is a wandb.proto Record.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path):
    """The protobuf Records of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a wandb transaction log (header {data[:_HEADER]!r})")
    pos, pieces = _HEADER, []
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # too small for a record header: zero padding up to the next block
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zeroed tail of an unfinished block (a run still writing, or killed)
            pos += left_in_block
            continue
        payload = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _FIRST):
            pieces = [payload]
        elif kind in (_MIDDLE, _LAST):
            pieces.append(payload)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            yield record


def read_wandb_offline(path) -> tuple[dict, list[dict]]:
    """(config, history rows) of a wandb offline run, from its run-<id>.wandb file (or its directory)."""
    path = Path(path)
    if path.is_dir():
        logs = sorted(path.glob("run-*.wandb"))
        if not logs:
            raise FileNotFoundError(f"no run-*.wandb in {path}")
        path = logs[0]
    config, rows = {}, []
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _update_config(config, record.run.config.update)
        elif kind == "config":
            _update_config(config, record.config.update)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    row[key] = json.loads(item.value_json)
            if "step" in row:
                rows.append(row)
    return config, rows


def _update_config(config: dict, items) -> None:
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        if not key.startswith("_"):  # wandb's own _wandb entry
            config[key] = json.loads(item.value_json)
