"""The one place that checks a composed training config: types, ranges and cross-key rules of the sections
`train`, `model`, `attn`, `data`, `optim` and `parallel`, and unknown keys (also those added with `+`).

`check(cfg)` collects every problem, one line each naming the key, the value and what is allowed, and raises one
`ConfigError` (a ValueError) listing them all:

    invalid config (2 problems):
      attn.sparsity must be a number in [0, 1), got 1.5
      unknown key train.max_step; did you mean train.max_steps?

It runs before any run directory is made: Hydra calls `ConfigCheck.on_run_start` (configs/train.yaml,
hydra.callbacks) before it creates hydra.run.dir; a multirun checks its base config in `on_multirun_start`
(before any job) and every job again in train.py's `main` (its sweep values are only known there; a job that
fails leaves no empty job directory). `vsa_train.trainer.check_config` calls `check` too.

Known keys are those of the config files themselves (configs/train.yaml for train and parallel, the group's
files for optim and data, where data keys are those of the files with the same data.source) and the config
dataclasses (`DiTConfig` for model, `WanConfig` for model=wan, `VSAConfig` for sparse attention), so a key added
to a config file is known without touching this module.
"""
from __future__ import annotations

import difflib
import math
import sys
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SECTIONS = ("train", "model", "attn", "data", "optim", "parallel")


class ConfigError(ValueError):
    """A composed config with bad values; `problems` holds one line per bad value."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"invalid config ({n} problem{'s' * (n != 1)}):\n  " + "\n  ".join(self.problems))


# ------------------------------------------------------------------------------------------------- known keys

def _load_group_file(group: str, name: str) -> dict:
    """A group option's own keys with those of the same-group files it lists in `defaults` (configs/attn/vsa...)."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{name}.yaml"))
    merged: dict = {}
    for entry in raw.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_":
            merged.update(_load_group_file(group, entry))
    merged.update(raw)
    return merged


@lru_cache(maxsize=None)
def _group_files(group: str) -> dict[str, dict]:
    return {p.stem: _load_group_file(group, p.stem) for p in sorted((CONFIGS / group).glob("*.yaml"))}


@lru_cache(maxsize=None)
def _root_keys(section: str) -> frozenset:
    return frozenset(OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml")).get(section, {}))


def known_keys(section: str, cfg: DictConfig) -> set[str]:
    """The keys allowed under `section` for this config (for data and attn they depend on the choice)."""
    if section in ("train", "parallel"):
        return set(_root_keys(section))
    if section == "optim":
        return {k for keys in _group_files("optim").values() for k in keys}
    if section == "model":
        from dataclasses import fields

        from .models.dit import DiTConfig
        from .models.wan import WanConfig, is_wan

        return WanConfig.keys() if is_wan(cfg.model) else {f.name for f in fields(DiTConfig)}
    if section == "attn":
        from dataclasses import fields

        from .models.attention import ATTENTION, DenseAttention
        from .models.vsa import VSAConfig

        if ATTENTION.get(cfg.attn.get("name")) is DenseAttention:
            return {"name"}
        return {f.name for f in fields(VSAConfig)}
    if section == "data":
        source = cfg.data.get("source")
        files = [keys for keys in _group_files("data").values() if keys.get("source") == source]
        return {k for keys in files for k in keys} | {"name", "source"}
    raise KeyError(section)


# ------------------------------------------------------------------------------------------------- value rules

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_list(v, n: int, low: int) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and len(v) == n and all(_is_int(x) and x >= low for x in v)


class _Checker:
    """Collects one line per bad value; each rule only looks at keys present (missing ones are Hydra's business)."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.problems = cfg, []

    def bad(self, line: str) -> None:
        self.problems.append(line)

    def value(self, key: str):
        """(present, value) of a dotted key; a missing mandatory value (???) is reported here."""
        section, name = key.split(".", 1)
        node = self.cfg.get(section)
        if node is None or name not in node.keys():  # `in` is False for a ??? value
            return False, None
        if OmegaConf.is_missing(node, name):
            self.bad(f"{key} is required (set {key}=...), got ???")
            return False, None
        return True, node[name]

    def rule(self, key: str, ok, allowed: str, optional: bool = False) -> None:
        present, v = self.value(key)
        if present and not (optional and v is None):
            try:
                good = ok(v)
            except (TypeError, ValueError):
                good = False
            if not good:
                self.bad(f"{key} must be {allowed}{' or null' if optional else ''}, got {_show(v)}")

    def ints(self, section: str, keys, low: int = 1, optional: bool = False) -> None:
        allowed = "a positive integer" if low == 1 else f"an integer >= {low}"
        for k in keys:
            self.rule(f"{section}.{k}", lambda v: _is_int(v) and v >= low, allowed, optional)

    def positive(self, section: str, keys, optional: bool = False) -> None:
        for k in keys:
            self.rule(f"{section}.{k}", lambda v: _is_num(v) and v > 0, "a positive number", optional)

    def choice(self, key: str, choices) -> None:
        self.rule(key, lambda v: v in choices and not (isinstance(v, bool) and True not in choices),
                  "one of " + ", ".join(map(str, choices)))

    def bools(self, section: str, keys) -> None:
        for k in keys:
            self.rule(f"{section}.{k}", lambda v: isinstance(v, bool), "true or false")

    def strings(self, section: str, keys, optional: bool = False) -> None:
        for k in keys:
            self.rule(f"{section}.{k}", lambda v: isinstance(v, str) and v != "", "a non-empty string", optional)


def _show(v) -> str:
    if isinstance(v, (DictConfig, ListConfig)):
        v = OmegaConf.to_container(v)
    return repr(v)


def _unknown_keys(c: _Checker) -> None:
    for section in SECTIONS:
        node = c.cfg.get(section)
        if node is None:
            continue
        if not isinstance(node, DictConfig):
            c.bad(f"{section} must be a config group (a mapping), got {_show(node)}")
            continue
        known = known_keys(section, c.cfg)
        for key in sorted(set(node) - known):
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {section}.{close[0]}?" if close else f"known: {', '.join(sorted(known))}"
            c.bad(f"unknown key {section}.{key}; {hint}")


def _train(c: _Checker) -> None:
    c.ints("train", ("batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every", "keep_checkpoints",
                     "eval_samples", "eval_timesteps", "eval_batch_size", "sample_count", "sample_steps"))
    c.ints("train", ("max_steps", "max_rollbacks"), low=0)
    c.ints("train", ("sample_every",), optional=True)
    c.rule("train.seed", _is_int, "an integer")
    c.positive("train", ("dist_timeout_s", "lock_stale_s", "explode_factor", "peak_tflops"))
    c.positive("train", ("flops_budget", "eval_every_flops"), optional=True)
    c.rule("train.ema", lambda v: _is_num(v) and 0 < v < 1, "a decay in (0, 1)", optional=True)
    c.rule("train.sample_cfg_scale", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    c.choice("train.mixed_precision", ("auto", "no", "bf16", "fp16"))
    c.choice("train.resume", ("auto", "never", "force"))
    c.choice("train.on_nonfinite", ("stop", "rollback"))
    c.rule("train.compile", lambda v: v in (True, False, "blocks", "model"), "one of true, false, blocks, model")
    c.bools("train", ("dry_run", "ckpt_background"))
    c.strings("train", ("init_from", "compile_cache"), optional=True)


def _model(c: _Checker) -> None:
    from .models.dit import CHECKPOINTING
    from .models.wan import is_wan

    if is_wan(c.cfg.get("model") or {}):
        return _wan(c)
    c.ints("model", ("hidden_size", "depth", "num_heads", "freq_dim"))
    c.positive("model", ("mlp_ratio", "rope_theta"))
    c.rule("model.patch_size", lambda v: _int_list(v, 3, 1), "3 positive integers [t, h, w]")
    c.bools("model", ("qk_norm",))
    c.rule("model.grad_checkpointing", lambda v: v in CHECKPOINTING or isinstance(v, bool),
           "one of " + ", ".join(CHECKPOINTING))
    m = c.cfg.get("model") or {}
    hidden, heads = m.get("hidden_size"), m.get("num_heads")
    if _is_int(hidden) and _is_int(heads) and hidden >= 1 and heads >= 1:
        if hidden % heads:
            c.bad(f"model.hidden_size={hidden} must be divisible by model.num_heads={heads}")
        elif (hidden // heads) % 2:
            c.bad(f"model.hidden_size / model.num_heads = {hidden // heads} must be even (rotary embedding)")


def _wan(c: _Checker) -> None:
    """model=wan (vsa_train/models/wan.py): its shape keys, the folder of `path`, what it does not support."""
    from .models.wan import CHECKPOINTING, WanConfig

    c.ints("model", ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "freq_dim",
                     "rope_max_seq_len"))
    c.positive("model", ("eps",))
    c.rule("model.patch_size", lambda v: _int_list(v, 3, 1), "3 positive integers [t, h, w]")
    c.rule("model.attention_head_dim", lambda v: not _is_int(v) or v % 2 == 0, "even (rotary embedding)")
    c.rule("model.grad_checkpointing", lambda v: v in CHECKPOINTING,
           "one of none, full for model=wan (diffusers checkpoints every block or none)")
    c.strings("model", ("path", "subfolder"), optional=True)
    m = c.cfg.model
    if m.get("path") is None or any(p.startswith("model.") for p in c.problems):
        return
    try:
        folder = WanConfig.from_cfg(m)
    except (OSError, ValueError) as e:
        c.bad(f"model.path={_show(m.path)}: {e}")
        return
    if tuple(m.patch_size) != folder.patch_size:
        c.bad(f"model.patch_size={_show(m.patch_size)} differs from the patch size {list(folder.patch_size)} of "
              f"model.path={m.path}: set model.patch_size={list(folder.patch_size)}")


def _wan_fits(c: _Checker, spec) -> None:
    """model=wan: a folder's input channels and text width against the data; attention and layout limits."""
    from .models.wan import WanConfig, attn_problems, is_wan

    m = c.cfg.get("model") or {}
    if not is_wan(m):
        return
    try:
        for line in attn_problems(c.cfg.attn) if c.cfg.get("attn") is not None else ():
            c.bad(line)
    except (TypeError, ValueError):  # a bad attn value, reported by _attn
        pass
    sp = (c.cfg.get("parallel") or {}).get("sp_size")
    if _is_int(sp) and sp > 1:
        c.bad(f"parallel.sp_size={sp} is not supported with model=wan (Ulysses hooks into VideoDiT's attention): "
              f"allowed: 1")
    if spec is None or m.get("path") is None or any(p.startswith("model.") for p in c.problems):
        return
    folder = WanConfig.from_cfg(m)
    if (folder.in_channels, folder.text_dim) != (spec.in_channels, spec.text_dim):
        c.bad(f"model.path={m.path} takes {folder.in_channels} input channels and text of width {folder.text_dim}; "
              f"data={c.cfg.data.get('name')} gives {spec.in_channels} and {spec.text_dim} (for a pretrained Wan "
              f"train on its VAE latents and text encoder: data=latents)")


def _grid(c: _Checker, spec):
    """The token grid (T, H, W) after patchify, or None when the sizes do not divide (reported here)."""
    patch = (c.cfg.get("model") or {}).get("patch_size")
    if spec is None or not _int_list(patch, 3, 1):
        return None
    shape = tuple(spec.video_shape)
    if any(not _is_int(n) or n < 1 for n in shape):
        return None
    if any(n % p for n, p in zip(shape, patch)):
        c.bad(f"data (frames, height, width) = {shape} must be divisible by model.patch_size = {list(patch)}")
        return None
    return tuple(n // p for n, p in zip(shape, patch))


def _attn(c: _Checker, grid) -> None:
    from .models.attention import ATTENTION, DenseAttention
    from .models.vsa import SCHEDULES, SELECTIONS

    a = c.cfg.get("attn")
    if a is None:
        return
    c.choice("attn.name", tuple(ATTENTION))
    if ATTENTION.get(a.get("name"), DenseAttention) is DenseAttention:
        return
    c.rule("attn.sparsity", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
    c.ints("attn", ("topk",), optional=True)
    c.rule("attn.tile", lambda v: _int_list(v, 3, 1), "3 positive integers [t, h, w]")
    c.rule("attn.window", lambda v: _int_list(v, 3, 0), "3 integers >= 0 [t, h, w]")
    c.bools("attn", ("gate_coarse", "gate_fine", "coarse", "fine"))
    c.choice("attn.schedule", SCHEDULES)
    c.choice("attn.select", SELECTIONS)
    c.choice("attn.backend", ("auto", "triton", "torch"))
    if a.get("schedule") == "ramp":
        c.positive("attn", ("ramp_rate",))
        c.ints("attn", ("ramp_interval",))
    depth = (c.cfg.get("model") or {}).get("depth")
    layers = a.get("dense_layers")
    if layers is not None and not (isinstance(layers, (list, ListConfig)) and all(
            _is_int(i) and 0 <= i < (depth if _is_int(depth) else math.inf) for i in layers)):
        c.bad(f"attn.dense_layers must be a list of block indices in [0, model.depth={depth}), got {_show(layers)}")
    if a.get("coarse") is False and a.get("fine") is False:
        c.bad("attn.coarse=false and attn.fine=false: at least one of them must be true")
    if a.get("select") == "window" and a.get("coarse") is True:
        c.bad("attn.coarse=true with attn.select=window: a fixed window takes no coarse stage (set attn.coarse=false)")
    topk, tile = a.get("topk"), a.get("tile")
    if grid is not None and _is_int(topk) and topk >= 1 and _int_list(tile, 3, 1):
        tiles = math.prod(-(-g // t) for g, t in zip(grid, tile))
        if topk > tiles:
            c.bad(f"attn.topk must be at most the {tiles} tiles of the {'x'.join(map(str, grid))} token grid "
                  f"(attn.tile={list(tile)}), got {topk} (use attn.sparsity or attn=dense for all tiles)")


def _data(c: _Checker):
    """Checks data; returns its DataSpec (None when it cannot be built)."""
    from .data import SOURCES, data_spec

    d = c.cfg.get("data")
    if d is None:
        return None
    source = d.get("source")
    if source not in SOURCES:
        c.bad(f"data.source must be one of {', '.join(sorted(SOURCES))}, got {_show(source)}")
        return None
    c.ints("data", ("frames", "height", "width", "text_len", "text_dim", "max_shapes", "stride"))
    c.ints("data", ("num_workers", "holdout"), low=0)
    c.rule("data.seed", _is_int, "an integer")
    c.positive("data", ("fps",), optional=True)
    c.rule("data.caption_dropout", lambda v: _is_num(v) and 0 <= v < 1, "a probability in [0, 1)")
    c.rule("data.max_caption_bytes", lambda v: _is_int(v) and 1 <= v <= 16 * 2**20, "an integer in [1, 16 MiB]")
    c.choice("data.backend", ("auto", "decord", "pyav"))
    c.bools("data", ("allow_outside_root",))
    c.strings("data", ("split", "video_column", "caption_column"))
    if source in ("hf", "latents"):
        c.strings("data", ("path",))
    if source == "videos":
        c.strings("data", ("manifest", "folder"), optional=True)
        if d.get("manifest") is not None and d.get("folder") is not None:
            c.bad(f"data.manifest={d.manifest!r} and data.folder={d.folder!r}: set only one of them")
    n = len(c.problems)
    if any(p.startswith("data.") for p in c.problems):
        return None
    try:
        return data_spec(d)
    except Exception as e:  # latents: the index file is missing or damaged
        if len(c.problems) == n:
            c.bad(f"data.path={_show(d.get('path'))}: {e}")
        return None


def _optim(c: _Checker) -> None:
    c.positive("optim", ("lr",))
    c.rule("optim.weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    c.ints("optim", ("warmup_steps",), low=0)
    c.positive("optim", ("grad_clip",), optional=True)
    c.rule("optim.betas", lambda v: isinstance(v, (list, ListConfig)) and len(v) == 2
           and all(_is_num(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)")
    c.rule("optim.min_lr_ratio", lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
    c.rule("optim.decay_fraction", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]")
    try:
        from .schedules import SCHEDULES
    except ImportError:  # pragma: no cover
        return
    c.choice("optim.schedule", SCHEDULES)


def _parallel(c: _Checker) -> None:
    from .parallel import STRATEGIES

    c.choice("parallel.strategy", STRATEGIES)
    c.ints("parallel", ("sp_size",))
    c.bools("parallel", ("reshard_after_forward",))
    sp, heads = (c.cfg.get("parallel") or {}).get("sp_size"), (c.cfg.get("model") or {}).get("num_heads")
    if _is_int(sp) and sp >= 1 and _is_int(heads) and heads >= 1 and heads % sp:
        c.bad(f"parallel.sp_size={sp} must divide model.num_heads={heads} (Ulysses splits the heads)")


def problems(cfg: DictConfig) -> list[str]:
    """Every problem of the config, one line each (empty when it is fine)."""
    c = _Checker(cfg)
    _unknown_keys(c)
    _train(c)
    _model(c)
    _optim(c)
    _parallel(c)
    spec = _data(c)
    _attn(c, _grid(c, spec))
    _wan_fits(c, spec)
    return c.problems


def check(cfg: DictConfig) -> None:
    """Raises one ConfigError listing every bad value of the config."""
    if found := problems(cfg):
        raise ConfigError(found)


def remove_if_empty(run_dir) -> bool:
    """Removes a run directory that holds nothing but Hydra's .hydra/ and empty log files (a launch that failed
    the check); a directory with anything else (an existing run) is left alone. True if it was removed."""
    import shutil

    path = Path(run_dir)
    if not path.is_dir():
        return False
    for entry in path.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            continue
        if entry.is_file() and entry.suffix == ".log" and entry.stat().st_size == 0:
            continue
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class ConfigCheck(Callback):
    """Hydra callback (configs/train.yaml, hydra.callbacks): checks the config before Hydra makes any directory.
    A single run is checked whole; a multirun its base config (each job again in train.py, with its sweep values)."""

    def _check(self, config: DictConfig) -> None:
        found = problems(config)
        if found:
            print(str(ConfigError(found)), file=sys.stderr)
            raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)
