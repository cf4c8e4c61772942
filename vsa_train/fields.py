"""Typed config sections: each section of the config is a frozen dataclass whose fields carry their own rule, and
`read` turns a section's mapping (a DictConfig or a dict) into that dataclass or into one line per problem.

    @dataclass(frozen=True)
    class OptimConfig:
        lr: float = positive(6e-4)
        schedule: str = choice("constant", LR_SCHEDULES)

        def validate(self) -> list[str]:   # the section's cross-key rules, run once every field is valid
            return []

A rule is written once, on its field (type, range, choice) or in the section's `validate` (keys that depend on
each other); rules that join sections are the root config's `validate` (vsa_train/config_schema.py). Problems read
as `optim.lr must be a positive number, got -1` and `unknown key optim.betas2; did you mean optim.betas?`. Fields
without a rule are derived, not config keys. Of vsa_train this module imports only errors.py (ConfigError is a
LaunchError), so every layer can declare its section with it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass

from .errors import LaunchError


class ConfigError(LaunchError, ValueError):
    """A config with bad values; `problems` holds one line per bad value (one problem reads as one line)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"invalid config: {self.problems[0]}" if n == 1 else
                         f"invalid config ({n} problems):\n  " + "\n  ".join(self.problems))

    def __reduce__(self):  # pickled with its problems (a SLURM job's result travels pickled)
        return type(self), (self.problems,)


class Section:
    """Base of every config section: `validate` gives the lines of its cross-key rules (none by default)."""

    def validate(self) -> list[str]:
        return []

    def complete(self):
        """The section with what it derives from outside the config filled in (a Wan folder's shape); valid only."""
        return self


@dataclass(frozen=True)
class Rule:
    ok: Callable[[object], bool]   # the value (as YAML gives it: lists, not tuples) is allowed
    allowed: str                   # what is allowed, for the problem line: "a positive integer"
    optional: bool = False         # null is allowed too
    convert: Callable | None = None  # the value the dataclass holds (a list as a tuple, ...)


def setting(default=MISSING, *, ok, allowed: str, optional: bool = False, convert=None):
    """A config field with its rule (the helpers below are the common ones). A list default is held converted
    (a tuple): sections are frozen and hashable."""
    if isinstance(default, list):
        default = convert(default)
    return dataclasses.field(default=default, metadata={"rule": Rule(ok, allowed, optional, convert)})


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(default=MISSING, low: int = 1, optional: bool = False):
    allowed = "a positive integer" if low == 1 else f"an integer >= {low}"
    return setting(default, ok=lambda v: is_int(v) and v >= low, allowed=allowed, optional=optional)


def positive(default=MISSING, optional: bool = False):
    return setting(default, ok=lambda v: is_num(v) and v > 0, allowed="a positive number", optional=optional)


def number(default, ok, allowed: str):
    """A finite number for which `ok` holds (a range)."""
    return setting(default, ok=lambda v: is_num(v) and ok(v), allowed=allowed)


def choice(default, choices, allowed: str | None = None):
    """One of `choices` (a bool is not taken for 1 or 0)."""
    return setting(default, ok=lambda v: v in choices and not (isinstance(v, bool) and True not in choices),
                   allowed=allowed or "one of " + ", ".join(map(str, choices)))


def flag(default):
    return setting(default, ok=lambda v: isinstance(v, bool), allowed="true or false")


def text(default=MISSING, optional: bool = False):
    return setting(default, ok=lambda v: isinstance(v, str) and v != "", allowed="a non-empty string",
                   optional=optional)


def int_list(n: int, low: int, default=MISSING, allowed: str | None = None):
    """`n` integers >= low, held as a tuple."""
    return setting(default, ok=lambda v: isinstance(v, (list, tuple)) and len(v) == n
                   and all(is_int(x) and x >= low for x in v),
                   allowed=allowed or f"{n} integers >= {low}", convert=tuple)


def keys(cls) -> list[str]:
    """The config keys of a section class (its fields with a rule)."""
    return [f.name for f in dataclasses.fields(cls) if "rule" in f.metadata]


def show(v) -> str:
    return repr(v)


def read(cls, node, section: str, defer_unresolved: bool = False):
    """(the section as `cls`, []) or (None, every problem of it, one line each). A value whose interpolation does
    not resolve is a problem, or with `defer_unresolved` (Hydra's launching process: a job's environment may
    resolve it) left to the job's own check; the section is then (None, []) when it cannot be built without it."""
    if not isinstance(node, Mapping):
        return None, [f"{section} must be a config group (a mapping), got {show(node)}"]
    values, missing, unresolved = _plain(node)
    rules = {f.name: f for f in dataclasses.fields(cls) if "rule" in f.metadata}
    problems = [] if defer_unresolved else [f"{section}.{k} does not resolve: {e}" for k, e in unresolved.items()]
    problems += [unknown_key(key, section, rules) for key in sorted(set(values) - set(rules) - set(unresolved))]
    kwargs = {}
    for name, f in rules.items():
        key, rule = f"{section}.{name}", f.metadata["rule"]
        required = f.default is MISSING and f.default_factory is MISSING
        if name in unresolved:
            if required and defer_unresolved and not problems:
                return None, []
            continue
        if name in missing or (required and name not in values):
            problems.append(f"{key} is required (set {key}=...), got ???")
        elif name in values:
            v = values[name]
            if v is None and rule.optional:
                kwargs[name] = None
                continue
            try:
                good = bool(rule.ok(v))
            except (TypeError, ValueError):
                good = False
            if good:
                kwargs[name] = rule.convert(v) if rule.convert else v
            else:
                problems.append(f"{key} must be {rule.allowed}{' or null' if rule.optional else ''}, got {show(v)}")
    if problems:
        return None, problems
    section_cfg = cls(**kwargs)
    problems = list(section_cfg.validate())
    return (None, problems) if problems else (section_cfg.complete(), [])


def read_or_raise(cls, node, section: str):
    """The section as `cls`; ConfigError listing its problems otherwise (for callers outside the trainer)."""
    if isinstance(node, cls):
        return node
    section_cfg, problems = read(cls, node, section)
    if problems:
        raise ConfigError(problems)
    return section_cfg


def _plain(node) -> tuple[dict, set, dict]:
    """A section's values as plain Python (lists, dicts), the keys whose value is missing (???), and why each
    value whose interpolation does not resolve does not."""
    if isinstance(node, dict):  # without omegaconf: an export's code (integrations/remote_code.py) runs without it
        return dict(node), set(), {}
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    if not isinstance(node, DictConfig):
        return dict(node), set(), {}
    values, missing, unresolved = {}, set(), {}
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            missing.add(key)
            continue
        try:
            value = node[key]
            values[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except InterpolationResolutionError as err:
            unresolved[key] = str(err).splitlines()[0]
    return values, missing, unresolved


def unknown_key(key: str, section: str, known) -> str:
    """The line for `key` of `section` ("" for the root), which has only the keys `known`: the closest one, else
    all of them."""
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(sorted(known))}"
    return f"unknown key {prefix}{key}; {hint}"
