"""The typed config: `typed(cfg)` reads a composed Hydra config into `Config`, one frozen dataclass per section,
or raises one `ConfigError` (a ValueError) listing every problem, one line each naming the key, the value and
what is allowed:

    invalid config (2 problems):
      attn.sparsity must be a number in [0, 1), got 1.5
      unknown key train.max_step; did you mean train.max_steps?

Each rule is written once: on its field or in its section's `validate` (vsa_train/fields.py says how), and the
rules that join sections in `Config.validate` below. The sections and where they live:

    train, optim, parallel, logger   vsa_train/sections.py
    model                            DiTConfig (models/dit.py), WanConfig for model=wan (models/wan.py)
    attn                             DenseConfig (models/attention.py), VSAConfig (models/vsa.py)
    data                             one class per data.source (data/config.py)

They are registered in Hydra's ConfigStore as `schema/<section>/<class>`; the YAML files in configs/ stay the
presets and experiments. The check runs once per launch, before any run directory is made: Hydra calls
`ConfigCheck.on_run_start` (configs/train.yaml, hydra.callbacks) before it creates hydra.run.dir; a multirun checks
its base config in `on_multirun_start` and each job in train.py's `main` (its sweep values are only known there).
The same check refuses launcher settings the trainer does not honour (vsa_train/launcher.py: accelerate launch
--use_fsdp, a precision that contradicts train.mixed_precision, ...).
train.py hands the trainer the typed config it read.
"""
from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .data import DataSpec, data_spec
from .data.config import SECTIONS as DATA_SECTIONS, DataSection, data_section
from .fields import ConfigError, Section, read, unknown_key
from .launcher import LauncherError, launch_problems
from .models import DenseConfig, DiTConfig, VSAConfig, WanConfig, attn_section, model_problems, model_section
from .models.wan import data_problems as wan_data_problems
from .sections import LoggerConfig, OptimConfig, ParallelConfig, TrainConfig

__all__ = ["Config", "ConfigCheck", "ConfigError", "JobFailed", "check", "override_problems", "problems",
           "remove_if_empty", "typed"]

# section -> its config class, given the section's values (model, attn and data depend on a choice in them)
SECTIONS = {
    "train": lambda node: TrainConfig,
    "model": model_section,
    "attn": lambda node: attn_section(node.get("name")),
    "data": lambda node: data_section(node.get("source")),
    "optim": lambda node: OptimConfig,
    "parallel": lambda node: ParallelConfig,
    "logger": lambda node: LoggerConfig,
}


@dataclass(frozen=True)
class Config:
    """A whole training config, typed; built by `typed`, which also ran every rule."""

    train: TrainConfig
    model: DiTConfig | WanConfig
    attn: DenseConfig | VSAConfig
    data: DataSection
    optim: OptimConfig
    parallel: ParallelConfig
    logger: LoggerConfig
    spec: DataSpec                     # what the data gives the model (latents: read from their index once)
    exp_name: str = ""
    run_dir: str | None = None         # Hydra's output directory (None outside a Hydra run)
    source: DictConfig | None = field(default=None, repr=False, compare=False)  # as composed: the run records it

    @property
    def grid(self) -> tuple[int, int, int]:
        """The token grid (T, H, W) after patchify."""
        return tuple(n // p for n, p in zip(self.spec.video_shape, self.model.patch_size))

    @property
    def tokens(self) -> int:
        """Video tokens per sample (a bucketed run: of its first bucket; `tokens_of` for the others)."""
        return self.tokens_of(self.spec.video_shape)

    def tokens_of(self, shape) -> int:
        """Video tokens of one sample of model-input shape (T, H, W)."""
        return math.prod(n // p for n, p in zip(shape, self.model.patch_size))

    @property
    def peak_tokens(self) -> int:
        """Video tokens per sample of the largest shape: where a bucketed run's memory peaks."""
        return max(map(self.tokens_of, self.shapes))

    @property
    def is_wan(self) -> bool:
        return isinstance(self.model, WanConfig)

    @property
    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The video shapes (T, H, W) of the model input the run's batches take: the data's one shape (a bucketed
        run: its buckets, the first one the default of FLOPs summaries and samples)."""
        if self.spec.buckets:
            return tuple(tuple(s) for s in self.spec.buckets)
        return (tuple(self.spec.video_shape),)

    def global_batch(self, dp_size: int) -> int:
        """Samples per optimizer step over all ranks: batch_size x grad_accum x data-parallel ranks."""
        return self.train.batch_size * self.train.grad_accum * dp_size

    def validate(self) -> list[str]:
        """The rules that join sections."""
        shape, patch = tuple(self.spec.video_shape), list(self.model.patch_size)
        odd = [list(s) for s in self.spec.buckets if any(n % p for n, p in zip(s, patch))]
        if odd:  # the VSA tile need not divide them (edge tiles); the patch must
            what = "the buckets' latent (T, H, W)" if self.data.source == "latents" else "data.buckets"
            return [f"{what} {odd} must be divisible by model.patch_size = {patch}"]
        if any(n % p for n, p in zip(shape, patch)):
            return [f"data (frames, height, width) = {shape} must be divisible by model.patch_size = {patch}"]
        if self.train.sample_shape is not None and any(n % p for n, p in zip(self.train.sample_shape, patch)):
            return [f"train.sample_shape = {list(self.train.sample_shape)} must be divisible by model.patch_size = "
                    f"{patch}"]
        bad = model_problems(self.model, self.attn) + self._layout_problems()
        if self.is_wan:
            bad += wan_data_problems(self.model, self.spec.in_channels, self.spec.text_dim, f"data={self.data.name}")
        if isinstance(self.attn, VSAConfig) and self.attn.topk is not None:
            # every shape the run trains on must have that many tiles: a bucketed run's smallest bucket decides
            grids = [tuple(n // p for n, p in zip(shape, patch)) for shape in self.shapes]
            tiles, grid = min((math.prod(-(-g // t) for g, t in zip(grid, self.attn.tile)), grid) for grid in grids)
            if self.attn.topk > tiles:
                of = f" (the smallest of data.buckets, {len(grids)} buckets)" if len(grids) > 1 else ""
                bad.append(f"attn.topk must be at most the {tiles} tiles of the {'x'.join(map(str, grid))} token "
                           f"grid{of} (attn.tile={list(self.attn.tile)}), got {self.attn.topk} (use attn.sparsity or "
                           f"attn=dense for all tiles)")
        return bad

    def _layout_problems(self) -> list[str]:
        sp, bad = self.parallel.sp_size, []
        if sp > 1 and self.is_wan:
            bad.append(f"parallel.sp_size={sp} is not supported with model=wan (Ulysses hooks into VideoDiT's "
                       f"attention): allowed: 1")
        elif self.model.num_heads % sp:
            bad.append(f"parallel.sp_size={sp} must divide model.num_heads={self.model.num_heads} (Ulysses splits "
                       f"the heads)")
        if self.train.ema is not None and self.parallel.strategy == "fsdp":
            bad.append("train.ema is not supported with parallel.strategy=fsdp (the EMA copy would hold full, "
                       "unsharded weights)")
        return bad


def _read_sections(cfg: DictConfig, defer_unresolved: bool) -> tuple[dict, list[str]]:
    """Every section read into its class (None where it has problems) and those problems."""
    sections, found = {}, []
    for name, section_class in SECTIONS.items():
        node = cfg.get(name)
        if not isinstance(node, DictConfig):
            found.append(f"{name} must be a config group (a mapping), got {node!r}")
            continue
        try:
            cls = section_class(node)
        except ConfigError as err:  # an unknown model, attention or data source
            found += err.problems
            continue
        sections[name], bad = read(cls, node, name, defer_unresolved)
        found += bad
    return sections, found


def _read(cfg: DictConfig, defer_unresolved: bool = False) -> tuple[Config | None, list[str]]:
    sections, found = _read_sections(cfg, defer_unresolved)
    if found or None in sections.values():  # a problem, or a section left to the job (defer_unresolved)
        return None, found
    try:
        spec = data_spec(sections["data"])
    except Exception as e:  # noqa: BLE001 (latents: the index file is missing or damaged)
        return None, [f"data.path={sections['data'].get('path')!r}: {e}"]
    config = Config(**sections, spec=spec, exp_name=str(OmegaConf.select(cfg, "exp_name", default="") or ""),
                    run_dir=OmegaConf.select(cfg, "run_dir", throw_on_resolution_failure=False), source=cfg)
    return config, config.validate()


def typed(cfg: DictConfig) -> Config:
    """The typed config; one ConfigError listing every problem otherwise."""
    config, found = _read(cfg)
    if found:
        raise ConfigError(found)
    return config


def problems(cfg: DictConfig, defer_unresolved: bool = False) -> list[str]:
    """Every problem of the config, one line each (empty when it is fine). `defer_unresolved`: values whose
    interpolation does not resolve here are left to the job (`fields.read`)."""
    return _read(cfg, defer_unresolved)[1]


def check(cfg: DictConfig) -> None:
    """Raises one ConfigError listing every bad value of the config."""
    typed(cfg)


def register() -> None:
    """Every section class in Hydra's ConfigStore, as schema/<section>/<class> (the presets stay YAML files)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    classes = {"train": [TrainConfig], "optim": [OptimConfig], "parallel": [ParallelConfig],
               "logger": [LoggerConfig], "model": [DiTConfig, WanConfig], "attn": [DenseConfig, VSAConfig],
               "data": list(DATA_SECTIONS.values())}
    for section, members in classes.items():
        for cls in members:
            store.store(group=f"schema/{section}", name=cls.__name__, node=cls)


# ------------------------------------------------------------------------------- command-line keys, before Hydra

def override_problems(args: list[str], config_dir, config_name: str = "train") -> list[str]:
    """One line per `key=value` of the command line `args` whose key the config composed with its group choices
    lacks: the group options that have it (`attn.sparsity` under attn=dense), else the closest key. Hydra itself
    would refuse it with "To append to your config use +key=value", the wrong fix for a typo. Empty where the line
    does not parse, sweeps a group or does not compose: Hydra then reports as it does."""
    config_dir = Path(config_dir).resolve()
    keys, choices = _command_line(args, config_dir)
    cfg = _compose(config_dir, config_name, choices) if keys and choices is not None else None
    if cfg is None:
        return []
    tree, found = _tree(cfg), []
    for key in keys:
        line, group = _missing_key(tree, key), key.split(".")[0]
        if line and group in tree and (config_dir / group).is_dir():  # a key of another option of the group?
            owners = _options_with(key, group, choices, config_dir, config_name)
            if owners:
                also = f" (also {', '.join(f'{group}={o}' for o in owners[1:])})" if owners[1:] else ""
                line = f"{key} belongs to {group}={owners[0]}{also}, not {group}={cfg.hydra.runtime.choices[group]}"
        found += [line] if line else []
    return found


def _command_line(args: list[str], config_dir: Path) -> tuple[list[str], list[str] | None]:
    """(the keys that `args` set as key=value, the overrides that choose group options); choices None where the line
    does not parse or sweeps a group. Hydra's own keys and groups are Hydra's business."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except HydraException:
        return [], None
    groups = {p.name for p in config_dir.iterdir() if p.is_dir()}
    keys, choices = [], []
    for override in overrides:
        name = override.key_or_group
        if name.split("/")[0].split(".")[0] == "hydra":
            continue
        if name in groups or "/" in name:
            if override.is_sweep_override():
                return keys, None
            choices.append(override.input_line)
        elif override.type == OverrideType.CHANGE and override.package is None:  # `+key`: the schema's check
            keys.append(name)
    return keys, choices


def _compose(config_dir: Path, config_name: str, overrides: list[str]) -> DictConfig | None:
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception:  # noqa: BLE001 (Hydra reports the same failure when it composes)
        return None


def _tree(cfg: DictConfig) -> dict:
    """The config as plain dicts and lists, interpolations unresolved, without Hydra's own node."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    return tree


def _missing_key(tree: dict, key: str) -> str | None:
    """The line for `key` if `tree` lacks it (its closest key at the first missing level), else None."""
    parts, node = key.split("."), tree
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return None  # a list index, or inside a value: Hydra's own check
        if part not in node:
            return unknown_key(part, ".".join(parts[:i]), node)
        node = node[part]
    return None


def _options_with(key: str, group: str, choices: list[str], config_dir: Path, config_name: str) -> list[str]:
    """The options of `group` whose composed config has `key`; first those whose own file sets it."""
    others = [c for c in choices if c.lstrip("+~").split("=")[0] != group]
    owners = []
    for option in sorted(p.stem for p in (config_dir / group).glob("*.yaml")):
        cfg = _compose(config_dir, config_name, [*others, f"{group}={option}"])
        if cfg is not None and _missing_key(_tree(cfg), key) is None:
            own = OmegaConf.to_container(OmegaConf.load(config_dir / group / f"{option}.yaml"))
            owners.append((_missing_key(own, key.split(".", 1)[1]) is not None, option))
    return [option for _, option in sorted(owners)]


# ------------------------------------------------------------------------------------ Hydra's run directory

def remove_if_empty(run_dir) -> bool:
    """Removes a run directory that holds nothing of a run, only Hydra's .hydra/ and log files: a launch that
    stopped before the trainer accepted it (which writes config.yaml) and released its lock. A directory with
    anything else (an existing run, a live launch's run.lock) is left alone. True if it was removed."""
    path = Path(run_dir)
    if not path.is_dir():
        return False
    for entry in path.iterdir():
        if (entry.name == ".hydra" and entry.is_dir()) or (entry.is_file() and entry.suffix == ".log"):
            continue
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


try:
    from hydra.errors import CompactHydraException
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback, CompactHydraException = object, Exception


class JobFailed(CompactHydraException):
    """A multirun job's expected failure (errors.LaunchError), as its one line: Hydra prints it without a traceback
    once the sweep's other jobs ran, and exits non-zero (a SLURM job's result carries it back pickled)."""


class ConfigCheck(Callback):
    """Hydra callback (configs/train.yaml, hydra.callbacks): checks the config before Hydra makes any directory.
    A single run is checked whole; a multirun its base config (each job again in train.py, with its sweep values)."""

    def _check(self, config: DictConfig) -> None:
        # A value may resolve only in the job (${oc.env:...} set by a SLURM allocation): train.py checks it there.
        found = problems(config, defer_unresolved=True)
        if found:
            print(str(ConfigError(found)), file=sys.stderr)
            raise SystemExit(2)
        # What the launcher set (accelerate launch's options arrive as environment variables) against the config.
        train_section, _ = read(TrainConfig, config.get("train"), "train", defer_unresolved=True)
        found = launch_problems(train_section) if train_section is not None else []
        if found:
            print(str(LauncherError(found)), file=sys.stderr)
            raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)
