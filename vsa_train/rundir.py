"""The run directory: its name, paths, the launch record and checks (its lock, run.lock: vsa_train/runlock.py).

Its default name is runs/<exp_name>_<attn>_<data>_s<seed>_<settings_hash> (configs/train.yaml, the
${default_run_dir:...} resolver): the hash covers what a resume must match (FIXED) and the FLOPs budget (NAMED), so
the same command resumes and other settings get their own directory. A key at its default (`default_value`: the
schema's) is left out of the hash, and a key an older run's config.yaml lacks counts as its default in
`config_diff`: a release that adds a key at its default neither renames runs nor refuses their resume. Where that
rule renamed a run (the hash once covered defaults too), `default_run_dir` goes on in the run's older-named
directory and says so in one line. Under Hydra, `HydraRunDir` keeps Hydra's own files in it.

    run_dir/
      config.yaml             the resolved config the run started with; kept (a forced resume replaces it)
      config_history.jsonl    one line per launch: host, processes, global batch, the code's and data's commits,
                              what it changed or kept, forced or not
      .hydra/                 Hydra's record of the launch (config, hydra, overrides), written once it is accepted
      run.lock                the one writer: host, pid, SLURM job; refreshed by a heartbeat while held
      metrics.jsonl           one row per logged step (vsa_train/metrics.py)
      checkpoints/step_<N>/   the checkpoints (vsa_train/checkpoint/: format, listing, saving, loading)

Nothing here is ever unpickled: everything is JSON or YAML. A launch resumes the newest checkpoint that verifies
and names the ones it skips. A launch it refuses leaves the directory byte-identical. This module does files only
(no collectives): the trainer calls it on the ranks that must write and agrees across ranks around it.
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from .checkpoint.format import read_state
from .checkpoint.store import Checkpoints
from .config_schema import SECTIONS as SCHEMA
from .errors import RunDirError
from .fields import ConfigError
from .files import atomic_write, disk_error
from .runlock import LOCK, slurm_job, hold

CONFIG = "config.yaml"
HISTORY = "config_history.jsonl"
# Config sections that decide the training trajectory; a resume must match them (train.resume=force overrides).
TRAJECTORY = ("model", "attn", "data", "optim", "train.seed", "train.ema", "train.mixed_precision")
# Config keys a resume compares by what they resolve to at launch (RunDir._resolved_change): checkpoint field ->
# (Launch attribute, config key). The precision (auto follows the launcher) and a Hub dataset's commit.
RESOLVED = {"mixed_precision": ("precision", "train.mixed_precision"), "data_commit": ("data_commit", "data.revision")}
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
# What names a run's default directory, runs/<exp_name>_<attn>_<data>_s<seed>_<hash> (configs/train.yaml): the keys
# a resume must match, and the FLOPs budget: another budget is another run (a finished run must not go on under a
# new budget). train.max_steps stays out: raising it continues the run in its directory.
NAMED = (*FIXED, "train.flops_budget")
HASH_DIGITS = 8
# The keys that pick a section's schema class (config_schema.SECTIONS): always hashed, even at their "default" (a
# data.source always equals its own class's), since every other key's default depends on them.
SELECTORS = ("model.name", "attn.name", "data.source")
_ABSENT = object()  # a key the config does not have (None is a value)
_ANNOUNCED: set[str] = set()  # older-named run directories this process said it goes on in (said once)


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


def _values(cfg: DictConfig, keys) -> dict:
    """{key: resolved value} of `keys`, sections flattened, NOT_TRAJECTORY and missing keys left out. Only these
    keys are resolved (Hydra's ${hydra:...} elsewhere may not resolve yet)."""
    out = {}
    for key in keys:
        node = OmegaConf.select(cfg, key, default=_ABSENT)
        if node is _ABSENT:
            continue
        value = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
        out.update(_flatten(value, f"{key}.") if isinstance(value, dict) else {key: value})
    return {k: v for k, v in out.items() if not any(k == n or k.startswith(n + ".") for n in NOT_TRAJECTORY)}


def default_value(key: str, cfg: DictConfig):
    """What a config without `key` (section.field[.inner]) means: the field's default in the schema class `cfg`
    selects for that section (config_schema.SECTIONS), as YAML holds it; None where there is none (a required or
    unknown key, an unknown choice). The schema, not the config group's YAML: it is what the code does with a config
    that lacks the key (an older release's config.yaml), where a group file's value is one preset's choice."""
    section, _, rest = key.partition(".")
    node = OmegaConf.select(cfg, section, default=None)
    if section not in SCHEMA or not isinstance(node, DictConfig) or not rest:
        return None
    try:
        cls = SCHEMA[section](node)
    except ConfigError:  # an unknown model, attention or data source: no class, no defaults
        return None
    name, *inner = rest.split(".")
    spec = next((f for f in dataclasses.fields(cls) if f.name == name and "rule" in f.metadata), None)
    if spec is None or spec.default is dataclasses.MISSING:
        return None
    value = _as_yaml(spec.default)
    for part in inner:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _as_yaml(value):
    """A schema default as the resolved YAML holds it (the sections hold lists as tuples)."""
    return [_as_yaml(v) for v in value] if isinstance(value, (list, tuple)) else value


def config_diff(old: DictConfig, new: DictConfig) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every FIXED key that differs; a key one side lacks counts as its default
    there (`default_value`, by the classes `new` selects): a key a later release added at its default is no change."""
    a, b = _values(old, FIXED), _values(new, FIXED)
    diff = []
    for key in sorted(a.keys() | b.keys()):
        default = default_value(key, new) if key not in a or key not in b else None
        before, now = a.get(key, default), b.get(key, default)
        if before != now:
            diff.append((key, before, now))
    return diff


def settings_hash(cfg: DictConfig) -> str:
    """The hash in a default run directory's name: SHA-256 of the canonical JSON of the NAMED values, shortened.
    A value equal to its default (`default_value`) is left out, the SELECTORS never: a key added at its default, or
    missing from a config, leaves the name as it was, as `config_diff` sees no change in it."""
    values = {k: v for k, v in _values(cfg, NAMED).items() if k in SELECTORS or v != default_value(k, cfg)}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_DIGITS]


def default_run_dir(stem: str, cfg: DictConfig) -> str:
    """configs/train.yaml's hydra.run.dir: <stem><settings_hash>, stem = runs/<exp_name>_<attn>_<data>_s<seed>_.
    Where that holds no run but a sibling named under an older hashing rule (one that hashed defaults too) holds
    one with these settings (no `config_diff`, the same train.flops_budget), that sibling, said in one line: the
    same command goes on with its run. Several such: the one launched last. Every rank decides alike."""
    path = f"{stem}{settings_hash(cfg)}"
    if (Path(path) / CONFIG).is_file():
        return path
    older = [p for p, c in _siblings(Path(path)) if _same_settings(c, cfg)]
    if not older:
        return path
    found = str(max(older, key=_last_launch))
    if found not in _ANNOUNCED and int(os.environ.get("RANK", "0")) == 0:
        _ANNOUNCED.add(found)
        more = f" (the last launched of {len(older)} that match)" if len(older) > 1 else ""
        print(f"note: going on in {found}{more}, this run's directory under the older naming of run directories "
              f"(these settings now name {path}; vsa_train/rundir.py, settings_hash)", flush=True)
    return found


def _changes(old: DictConfig, cfg: DictConfig, budget: bool = True) -> list[tuple[str, object, object]]:
    """`config_diff` and (`budget`) a changed train.flops_budget: what makes `old`'s run another run than `cfg`'s."""
    diff = config_diff(old, cfg)
    before, now = (OmegaConf.select(c, "train.flops_budget", default=None) for c in (old, cfg))
    return diff + [("train.flops_budget", before, now)] if budget and before != now else diff


def _same_settings(old: DictConfig, cfg: DictConfig, budget: bool = True) -> bool:
    """Whether run config `old` has `cfg`'s settings (no `_changes`). False for one whose sections are not
    mappings: junk in a directory beside the run must not stop a launch."""
    try:
        return not _changes(old, cfg, budget)
    except (OmegaConfBaseException, TypeError, ValueError):
        return False


def settings_changes(run_dir, cfg: DictConfig) -> list[tuple[str, object, object]]:
    """(key, recorded, now) for each setting of `cfg` that the run in `run_dir` was made with otherwise (`_changes`:
    the FIXED keys, absent ones at their defaults, and the budget); RunDirError where its config.yaml does not load
    as a run's plain YAML (`_load_config`: nothing in it is run)."""
    path = Path(run_dir) / CONFIG
    old = _load_config(path)
    try:
        return _changes(old, cfg)
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        raise RunDirError(f"{path} does not load as a run's config: {str(err).splitlines()[0]}") from err


def _siblings(path: Path) -> list[tuple[Path, DictConfig]]:
    """(directory, its config) of the runs beside default-named `path` with its stem (<...>_s<seed>_<hash>); one
    whose config.yaml does not load (damaged, or a YAML tag, which is never run) is passed over with a warning."""
    stem = path.name[:-HASH_DIGITS]
    name = re.compile(re.escape(stem) + f"[0-9a-f]{{{HASH_DIGITS}}}")
    if not path.parent.is_dir():
        return []
    found = []
    for other in sorted(path.parent.iterdir()):
        if other.name == path.name or not name.fullmatch(other.name) or not (other / CONFIG).is_file():
            continue
        try:
            found.append((other, _load_config(other / CONFIG)))
        except RunDirError as err:
            warnings.warn(f"passing over {other}: {err}", stacklevel=2)
    return found


def _load_config(path: Path) -> DictConfig:
    """A run's config.yaml, read as plain YAML (a tag such as !!python/object is refused, never run); RunDirError
    naming it where it is no YAML mapping."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 (yaml's errors, an unreadable file)
        raise RunDirError(f"{path} does not load as a run's config: {str(err).splitlines()[0]}") from err
    if not isinstance(cfg, DictConfig):
        raise RunDirError(f"{path} does not load as a run's config: not a mapping")
    # written resolved (record_launch): an interpolation there would run a resolver on what the file says
    if "${" in json.dumps(OmegaConf.to_container(cfg, resolve=False), default=str):
        raise RunDirError(f"{path} does not load as a run's config: it holds an interpolation (${{...}}), and the "
                          f"trainer writes it resolved")
    return cfg


def _last_launch(run: Path) -> float:
    """When the run in `run` was last launched: its history's (else its config's) modification time."""
    history = run / HISTORY
    return (history if history.is_file() else run / CONFIG).stat().st_mtime


# configs/train.yaml's hydra.run.dir is ${default_run_dir:'runs/<stem>'} (run_hash: the hash alone, as before).
# Registered on import: train.py (through the trainer) and the tests that compose configs import this module before
# Hydra resolves that key. Not cached: what is on disk decides.
OmegaConf.register_new_resolver("run_hash", lambda *, _root_: settings_hash(_root_), replace=True)
OmegaConf.register_new_resolver("default_run_dir", lambda stem, *, _root_: default_run_dir(str(stem), _root_),
                                replace=True)


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
    precision: str | None = None  # the resolved mixed precision (launcher.Precision; None: compare the config's)
    precision_source: str = ""  # where it came from, for a refusal's line
    code_commit: str | None = None  # the code it runs (provenance.code_commit), for the history
    data_commit: str | None = None  # the commit data.revision resolved to (a Hub dataset id; data.data_commit)


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
        precision = self._resolved_change(launch, state, "mixed_precision")
        if launch.resume == "auto" and precision:
            _, before, now = precision[0]
            raise RunDirError(
                f"{ckpt or self.path} was trained in {before} precision; this launch resolves {now} "
                f"({launch.precision_source or 'train.mixed_precision'}): launch it as before (the same "
                f"train.mixed_precision and accelerate launch --mixed_precision), use another run_dir, or "
                f"train.resume=force.")
        data = self._resolved_change(launch, state, "data_commit")
        if launch.resume == "auto" and data:
            raise RunDirError(_data_refusal(self.path, ckpt, launch, data[0]))
        if ckpt is not None:
            _check_position(ckpt, state, launch)
        return ckpt

    def record_launch(self, launch: Launch, resumed_from: "Path | None") -> None:
        """Writes config.yaml on a run's first launch (or one that changed it), Hydra's record, and appends the
        launch to the history: what it changed (forced, or a fresh start under never) and what the run kept."""
        self.path.mkdir(parents=True, exist_ok=True)
        state = read_state(resumed_from) if resumed_from is not None else {}
        batch, ends = _state_changes(launch, state)
        forced = launch.resume == "force"
        resolved = [c for key in RESOLVED for c in self._resolved_change(launch, state, key)]
        changed = self._config_changes(launch) + resolved + batch + (ends if forced else [])  # auto got here with none
        kept = [] if forced else ends  # auto: the run's learning-rate decay goes on to its own end
        if not (self.path / CONFIG).is_file() or changed:
            atomic_write(self.path / CONFIG, OmegaConf.to_yaml(launch.cfg, resolve=True))
        self._record_hydra(launch.cfg)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
                 "slurm_job": slurm_job(), "processes": launch.processes, "global_batch": launch.global_batch,
                 "code_commit": launch.code_commit, "data_commit": launch.data_commit,
                 "resume": launch.resume, "resumed_from": resumed_from and resumed_from.name,
                 "changed": {k: [a, b] for k, a, b in changed}, "kept": {k: [a, b] for k, a, b in kept},
                 "forced": forced and bool(changed)}
        try:
            with open(self.path / HISTORY, "a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        except OSError as err:
            raise disk_error(err, self.path / HISTORY) from err

    def _config_changes(self, launch: Launch) -> list[tuple[str, object, object]]:
        """The FIXED keys this launch changes against the run's config.yaml (none on a first launch); a resolved
        precision or dataset commit is compared by `_resolved_change` instead of its key."""
        diff = self._diff(launch.cfg)
        resolved = {name: getattr(launch, attr) for attr, name in RESOLVED.values()}
        return [d for d in diff if resolved.get(d[0]) is None]

    def _resolved_change(self, launch: Launch, state: dict, key: str) -> list[tuple[str, object, object]]:
        """[(key, the run's, this launch's)] where a value resolved at launch differs (RESOLVED[key]: its
        checkpoint field, the Launch attribute and the config key it resolves): the resumed checkpoint's against
        this launch's, so equal configs that resolve differently differ (train.mixed_precision=auto follows the
        launcher; data.revision=main may move) and different ones that resolve alike do not; without a checkpoint
        that recorded one, the config key is compared as any FIXED key."""
        now = getattr(launch, RESOLVED[key][0])
        if now is None:
            return []  # nothing resolved: the config key is compared with the config (`_config_changes`)
        if state.get(key) is not None:
            return [(key, state[key], now)] if state[key] != now else []
        return [d for d in self._diff(launch.cfg) if d[0] == RESOLVED[key][1]]

    def _diff(self, cfg: DictConfig) -> list[tuple[str, object, object]]:
        """`config_diff` of the run's config.yaml against `cfg` (none without one)."""
        config = self.path / CONFIG
        return config_diff(_load_config(config), cfg) if config.is_file() else []

    def _record_hydra(self, cfg: DictConfig) -> None:
        """Under Hydra, its record of this launch (what Hydra writes at job start, before any launch check), in the
        run directory (run_dir=X: in X)."""
        from hydra.core.hydra_config import HydraConfig  # here: only train.py's launches run under Hydra

        if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
            return  # not under Hydra, or Hydra wrote its record itself (hydra.output_subdir set on the command line)
        hydra = HydraConfig.instance().cfg
        folder = self.path / HYDRA_RECORD
        folder.mkdir(parents=True, exist_ok=True)
        for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra), ("overrides.yaml", hydra.hydra.overrides.task)):
            atomic_write(folder / name, OmegaConf.to_yaml(node))

    def budget_note(self, cfg: DictConfig) -> str | None:
        """For a new run in a default-named directory: a note naming the runs beside it that differ only in
        train.flops_budget (a new budget starts a new run; the user may have meant to continue one of those)."""
        if (self.path / CONFIG).is_file() or not self.path.name.endswith(f"_{settings_hash(cfg)}"):
            return None
        others = [(p, c) for p, c in _siblings(self.path) if _same_settings(c, cfg, budget=False)]
        if not others:
            return None
        budgets = ", ".join(f"{p} has train.flops_budget={_budget(c.train.get('flops_budget'))}" for p, c in others)
        return (f"note: a new run (train.flops_budget is part of a run directory's name): {budgets}, and otherwise "
                f"these settings. To continue that run under this budget instead, add run_dir={others[-1][0]}")

    # -- the lock

    def lock(self, stale_after_s: float):
        """Holds run.lock for the block: one writer per run directory (vsa_train/runlock.py)."""
        return hold(self.path / LOCK, stale_after_s)


# ------------------------------------------------------------------------------------------------ under Hydra

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class HydraRunDir(Callback):
    """Hydra callback (configs/train.yaml, hydra.callbacks): Hydra's own directory, where its train.log goes, is the
    run directory. `run_dir=X` on the command line moves it to X, so nothing is written elsewhere; a dry run, which
    writes no run, gets a temporary one, removed when it ends, and keeps run_dir as where the run would live."""

    def __init__(self):
        self.scratch = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        given = any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in config.hydra.overrides.task)
        if config.train.get("dry_run"):
            config.run_dir = str(config.run_dir if given else config.hydra.run.dir)  # printed, never made
            self.scratch = tempfile.mkdtemp(prefix="vsa_train_dry_run.")
        if given or self.scratch:
            with read_write(config.hydra):
                config.hydra.run.dir = self.scratch or str(config.run_dir)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- launch helpers

def _budget(value) -> str:
    return "null" if value is None else f"{value:g}"


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


def _data_refusal(run_dir: Path, ckpt: "Path | None", launch: Launch, change: tuple) -> str:
    """The one line that refuses a resume on another dataset commit (or, without a recorded one, revision)."""
    key, before, now = change
    data = launch.cfg.data
    if key == RESOLVED["data_commit"][1]:  # no checkpoint recorded a commit: the configs' revisions differ
        return (f"{run_dir} belongs to a run with data.revision={before!r}; this launch has {now!r}: keep it, use "
                f"another run_dir, or train.resume=force (recorded in config_history.jsonl).")
    # data.revision is part of a default run directory's name: a pinned launch must name this one
    return (f"{ckpt} trained on {data.path} at commit {before}; data.revision={data.get('revision') or 'main'} now "
            f"resolves to {now}: resume on its data with data.revision={before} run_dir={run_dir}, or go on with "
            f"the new commit with train.resume=force (recorded in config_history.jsonl).")


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


__all__ = ["CONFIG", "HydraRunDir", "LOCK", "Launch", "RunDir", "RunDirError", "config_diff", "default_run_dir",
           "default_value", "load_run_config", "settings_hash"]
