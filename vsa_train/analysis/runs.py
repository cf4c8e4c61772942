"""Reading finished (or interrupted) runs: metrics.jsonl with the run's config, or online wandb runs.

A run directory is found by its `metrics.jsonl`, which the trainer always writes (whatever the logger), read
beside the run's config.yaml or, failing that, Hydra's .hydra/config.yaml; record.json (the study runner's
one-line record) and config_history.jsonl (one line per launch, vsa_train/rundir.py) are read where present.
wandb is read only through its public API (`wandb.Api()`), for online runs: `wandb:<entity>/<project>[/<group>]`
in place of a directory (analysis/wandb_online.py).
"""
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..metrics import read_metrics
from ..rundir import EVAL_SET, HISTORY, NOT_TRAJECTORY, TRAJECTORY, load_run_config

EVAL = "eval/loss"
RECORD = "record.json"
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
    recipe: str = ""         # everything that decides the trajectory but the seed: runs alike here are seeds
    protocol: str = ""       # what decides the eval set (data config, eval samples and timesteps)
    init_from: str | None = None  # train.init_from: the run started from other weights
    record: dict = field(default_factory=dict, repr=False)  # record.json (commit, card, wall time, FLOPs)
    history: list = field(default_factory=list, repr=False)  # config_history.jsonl: one entry per launch

    def evals(self, key: str = EVAL) -> list[tuple[float, float]]:
        """(cumulative FLOPs, eval loss) of every eval row after step 0, in order."""
        return [(r["flops"], r[key]) for r in self.rows if r["step"] > 0 and r["flops"] > 0 and finite(r.get(key))]

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
        return points[-1:] if points and self.finished and finite(self.rows[-1].get(key)) else []

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


def finite(value) -> bool:
    """A real, finite number (not None, a bool, a string or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def timestep_of(key: str) -> float:
    return float(_T_KEY.match(key).group(1))


def from_metrics(path: Path) -> Run:
    """The run whose metrics.jsonl is `path`, with its config, record and launch history beside it."""
    try:
        cfg = load_run_config(path.parent)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} has no run config beside it, so the analysis cannot tell its attention "
                                f"and model ({err}; train.py writes config.yaml into every run directory)") from None
    rows = [r for r in read_metrics(path) if finite(r.get("flops"))]  # a row without FLOPs has no place on the axis
    if not rows:
        raise ValueError(f"{path} holds no rows with FLOPs")
    return run_from(path.parent, cfg, rows, record=_json(path.parent / RECORD), history=_history(path.parent))


def _json(path: Path) -> dict:
    """A JSON object file, {} when absent or unreadable (the record is optional)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _history(run_dir: Path) -> list[dict]:
    """config_history.jsonl's launches ([] when absent); a bad line is skipped."""
    try:
        lines = (run_dir / HISTORY).read_text().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return [e for e in entries if isinstance(e, dict)]


_NEEDED = ("model.name", "model.hidden_size", "model.depth", "attn.name")  # what a run is grouped and labelled by
_OTHER = ("train.flops_budget", "train.seed", "optim.schedule", "train.max_steps", "train.init_from")


def run_from(path: Path, cfg: DictConfig, rows: list[dict], record: dict | None = None,
             history: list | None = None) -> Run:
    """A Run from its directory (or wandb name), config and rows."""
    # .hydra/config.yaml keeps its interpolations, and some (${hydra:...}) resolve only inside a Hydra app: read
    # each value on its own, an unresolvable one counting as absent, so one odd entry cannot sink the run
    value = {key: OmegaConf.select(cfg, key, throw_on_resolution_failure=False) for key in (*_NEEDED, *_OTHER)}
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
               max_steps=value["train.max_steps"], recipe=_key(cfg, _RECIPE, drop=("train.seed",)),
               protocol=_key(cfg, _PROTOCOL), init_from=value["train.init_from"], record=record or {},
               history=history or [])


# the recipe: the trajectory sections (rundir.TRAJECTORY) and what ends the run; the seed is dropped from it
_RECIPE = (*TRAJECTORY, "train.flops_budget", "train.max_steps", "train.batch_size", "train.grad_accum",
           "train.init_from")
_PROTOCOL = ("data", *EVAL_SET)  # the eval set: evaluation.py
_IGNORED = (*NOT_TRAJECTORY, "data.name")  # data.name: two names of one data config score alike


def _key(cfg: DictConfig, keys, drop=()) -> str:
    """The values under `keys` (sections flattened; unresolvable values as written) as one sorted string."""
    flat = {}
    for key in keys:
        _flatten(OmegaConf.select(cfg, key, throw_on_resolution_failure=False), key, flat)
    skip = (*_IGNORED, *drop)
    kept = {k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in skip)}
    return json.dumps(kept, sort_keys=True, default=str)


def _flatten(node, prefix: str, out: dict) -> None:
    if isinstance(node, DictConfig):
        for key in node:
            _flatten(OmegaConf.select(node, str(key), throw_on_resolution_failure=False), f"{prefix}.{key}", out)
    elif node is not None and not (isinstance(node, str) and node.startswith("${")):
        out[prefix] = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


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
