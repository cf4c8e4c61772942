"""Reading finished (or interrupted) runs: metrics.jsonl with the run's config, or online wandb runs.

A run directory is found by its `metrics.jsonl`, which the trainer always writes (whatever the logger), read
beside the run's config.yaml or, failing that, Hydra's .hydra/config.yaml. wandb is read only through its
public API (`wandb.Api()`), for online runs: `wandb:<entity>/<project>[/<group>]` in place of a directory.
Offline wandb runs are not parsed (their transaction log is wandb's private format): analyse their run
directories, whose metrics.jsonl holds the same rows. Of the several wandb runs one run directory can have (one
per launch: vsa_train/metrics.py), the newest holds the whole history and is the one read.
"""
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..metrics import read_metrics
from ..rundir import load_run_config

EVAL = "eval/loss"
_T_KEY = re.compile(r"^eval/loss_t(\d+\.\d+)$")


@dataclass
class Run:
    """One training run: its rows (one dict per logged step) and the config values the analysis groups by."""

    path: Path
    attn: str                # attention type: dense, vsa, ...
    size: str                # model label: name and, where overridden, width x depth
    budget: float | None     # train.flops_budget
    rows: list[dict] = field(repr=False)
    seed: int = 0            # train.seed
    params: int | None = None  # parameters of the model (built on the meta device from the config)
    schedule: str = "constant"  # optim.schedule
    max_steps: int | None = None  # train.max_steps

    def evals(self, key: str = EVAL) -> list[tuple[float, float]]:
        """(cumulative FLOPs, eval loss) of every eval row after step 0, in order."""
        return [(r["flops"], r[key]) for r in self.rows if key in r and r["flops"] > 0]

    @property
    def reached_budget(self) -> bool:
        return self.budget is not None and bool(self.rows) and self.rows[-1]["flops"] >= self.budget

    @property
    def decays(self) -> bool:
        """A decaying learning rate (cosine, wsd): only the end of the run is what its compute buys."""
        return self.schedule not in ("constant", None)

    def frontier_points(self, key: str = EVAL, all_points: bool = False) -> list[tuple[float, float]]:
        """The points this run contributes to a loss-vs-FLOPs frontier: every eval point under a constant
        learning rate; under a decaying one only the final eval of a run that reached its end (its earlier
        points were taken before the decay, not what a run stopped there would reach), unless `all_points`."""
        points = self.evals(key)
        if not self.decays or all_points:
            return points
        return points[-1:] if points and self.finished else []

    @property
    def finished(self) -> bool:
        """Reached its FLOPs budget, or its step count when it has none."""
        if self.budget is not None:
            return self.reached_budget
        return self.max_steps is None or (bool(self.rows) and self.rows[-1]["step"] >= self.max_steps)

    def final(self, key: str = EVAL) -> float | None:
        points = self.evals(key)
        return points[-1][1] if points else None

    def timestep_keys(self) -> list[str]:
        """The per-timestep eval keys the run logged (eval/loss_t0.0625, ...), by increasing t."""
        keys = {k for r in self.rows for k in r if _T_KEY.match(k)}
        return sorted(keys, key=lambda k: float(_T_KEY.match(k).group(1)))


def timestep_of(key: str) -> float:
    return float(_T_KEY.match(key).group(1))


def find_runs(paths) -> list[Run]:
    """Every run under the given paths (run or sweep directories; `wandb:entity/project[/group]` for online
    wandb runs), sorted by path."""
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
            runs[metrics.parent.resolve()] = _from_metrics(metrics)
    if not runs:
        raise FileNotFoundError(f"no runs (metrics.jsonl) under {list(paths)}")
    return [runs[k] for k in sorted(runs, key=str)]


def _from_metrics(path: Path) -> Run:
    try:
        cfg = load_run_config(path.parent)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} has no run config beside it, so the analysis cannot tell its attention "
                                f"and model ({err}; train.py writes config.yaml into every run directory)") from None
    return _run(path.parent, cfg, read_metrics(path))


_NEEDED = ("model.name", "model.hidden_size", "model.depth", "attn.name")  # what a run is grouped and labelled by


def _run(path: Path, cfg: DictConfig, rows: list[dict]) -> Run:
    # .hydra/config.yaml keeps its interpolations, and some (${hydra:...}) resolve only inside a Hydra app: read
    # each value on its own, an unresolvable one counting as absent, so one odd entry cannot sink the run
    value = {key: OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
             for key in (*_NEEDED, "train.flops_budget", "train.seed", "optim.schedule", "train.max_steps")}
    if value["model.name"] is not None and value["model.hidden_size"] is None:  # model=wan: diffusers' names
        value["model.hidden_size"], value["model.depth"] = _wan_shape(cfg)
    missing = [key for key in _NEEDED if value[key] is None]
    if missing:
        raise ValueError(f"{path}: its config lacks {', '.join(missing)} (model name, width, depth and attn.name "
                         f"are needed)")
    size = f"{value['model.name']} ({value['model.hidden_size']}x{value['model.depth']})"
    return Run(path=path, attn=value["attn.name"], size=size, budget=value["train.flops_budget"],
               rows=sorted(rows, key=lambda r: r["step"]), seed=value["train.seed"] or 0,
               params=model_params(cfg), schedule=value["optim.schedule"] or "constant",
               max_steps=value["train.max_steps"])


def _wan_shape(cfg: DictConfig) -> tuple[int | None, int | None]:
    """(width, depth) of a model=wan run (its folder's when model.path is still there), else (None, None)."""
    from ..models import WanConfig, is_wan

    if not is_wan(cfg.model):
        return None, None
    try:
        shape = WanConfig.from_cfg(OmegaConf.to_container(cfg.model, resolve=True))
    except Exception:  # noqa: BLE001  (its folder is gone, or the config no longer parses)
        return None, None
    return shape.hidden_size, shape.depth


def model_params(cfg: DictConfig) -> int | None:
    """Parameters of the run's model, built on the meta device from its model, attn and data config (no
    weights allocated); None when the config does not describe a buildable model."""
    try:
        key = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, ["model", "attn", "data"]), resolve=True)
    except Exception:  # noqa: BLE001  (unresolvable or missing sections)
        return None
    return _params(key)


@functools.lru_cache(maxsize=256)
def _params(key: str) -> int | None:
    import torch

    from ..data import data_spec
    from ..models import build_model

    cfg = OmegaConf.create(key)
    try:
        spec = data_spec(cfg.data)
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim)
    except Exception:  # noqa: BLE001  (a partial or foreign config: the isoFLOP view leaves the run out)
        return None
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ wandb online

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
        runs.append(_run(Path(owner), OmegaConf.create(dict(remote.config)), rows))
    return runs
