"""The ledger: a grid's points, the records of the finished ones, and estimates of what is left."""
import fnmatch
import itertools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from ..errors import RunDirError
from ..metrics import read_metrics
from ..rundir import settings_changes
from ..runlock import holder

DEFAULT_TFLOPS = {"dense": 250.0, "vsa": 150.0}  # executed TFLOP/s before a group has a record (conservative)
DEFAULT_OVERHEAD_S = 100.0  # start-up, compilation, evals and the final save, before a group has a solo record
DEFAULT_PEAK_GIB = 60.0     # memory of a group without a record
CLAIMS = ".claims"          # RESULTS/.claims/<point>.lock: held by the runner running it (git ignores the folder)


@dataclass(frozen=True)
class Point:
    """One run of the grid: its command-line choices and the budget they resolve to."""

    name: str
    overrides: tuple[str, ...]
    group: str        # model and attention: the runs that share a speed and a memory peak
    budget: float
    config: DictConfig | None = field(default=None, compare=False, repr=False)  # as composed with the overrides


@dataclass(frozen=True)
class Estimate:
    """How long a point runs alone (fixed overhead + training at its group's rate) and its memory peak."""

    overhead_s: float
    train_s: float
    peak_gib: float

    @property
    def solo_s(self) -> float:
        return self.overhead_s + self.train_s


def grid_points(experiment: str, configs: Path, extra: list[str] = ()) -> list[Point]:
    """The experiment's sweep with `extra` overrides on every point, expanded in order (the first axis slowest)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(configs.resolve()), version_base=None):
        base = compose("train", overrides=[f"experiment={experiment}", *extra], return_hydra_config=True)
        axes = {k: [c.strip() for c in str(v).split(",")] for k, v in base.hydra.sweeper.params.items()}
        if not axes:
            raise SystemExit(f"experiment {experiment} sweeps nothing (hydra.sweeper.params is empty)")
        points = []
        for values in itertools.product(*axes.values()):
            overrides = tuple(f"{k}={v}" for k, v in zip(axes, values))
            cfg = compose("train", overrides=[f"experiment={experiment}", *overrides, *extra])
            if cfg.train.flops_budget is None:
                raise SystemExit(f"{experiment} {' '.join(overrides)}: no train.flops_budget; the runner needs one")
            group = f"{cfg.model.name}_{cfg.attn.name}"
            points.append(Point("_".join(values), overrides, group, float(cfg.train.flops_budget), cfg))
    return points


def read_record(results: Path, name: str) -> dict | None:
    """The record of a finished run, or None (absent or unreadable: the run counts as not done)."""
    try:
        record = json.loads((results / "runs" / name / "record.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("finished") is True else None


def unfinished(points: list[Point], results: Path, only=None) -> list[Point]:
    """The points without a finished record, of those whose name matches one of the globs `only` (all: None)."""
    return [p for p in points if not read_record(results, p.name)
            and (not only or any(fnmatch.fnmatch(p.name, pattern) for pattern in only))]


def other_settings(points: list[Point], results: Path) -> dict[str, str]:
    """The finished runs made with other settings than their point has now (the experiment as it reads today, with
    this invocation's overrides), each with how: a ledger holds one recipe, or its frontiers compare two."""
    out = {}
    for p in points:
        if p.config is None or read_record(results, p.name) is None:
            continue
        try:
            changes = settings_changes(results / "runs" / p.name, p.config)
        except RunDirError as err:
            out[p.name] = str(err)
            continue
        if changes:
            out[p.name] = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
    return out


def speed(rows: list[dict]) -> tuple[float, float, float]:
    """(samples/s, executed FLOPs per sample, peak GiB) of a run: the median logged rate after the first window
    (which holds compilation), FLOPs over samples at the last row, and the largest memory peak."""
    rates = [r["samples/s"] for r in rows if "samples/s" in r][1:] or [float("nan")]
    last = rows[-1]
    return (statistics.median(rates), last["flops"] / max(1, last.get("samples", 1)),
            max((r.get("mem/peak_GiB", 0.0) for r in rows), default=0.0))


def group_speeds(points: list[Point], results: Path, card: str | None = None) -> dict[str, dict]:
    """Per group, from its finished runs (those made on `card` where the group has any: H100 and H200 differ):
    the slowest training rate and the largest fixed overhead (wall time minus training time) of the runs that
    had the GPU alone (of any run, if none did: a shared run's rate is lower, so the estimate stays on the safe
    side), and the largest memory peak."""
    seen: dict[str, list[tuple[dict, float, float]]] = {}
    for p in points:
        record = read_record(results, p.name)
        if record is None:
            continue
        samples_s, flops_sample, peak = speed(read_metrics(results / "runs" / p.name / "metrics.jsonl"))
        if samples_s > 0:
            seen.setdefault(p.group, []).append((record, samples_s * flops_sample, peak))
    out = {}
    for group, runs in seen.items():
        runs = [run for run in runs if run[0].get("card") == card] or runs
        solo = [run for run in runs if run[0].get("lanes", 1) == 1]
        out[group] = {"flops_s": min(rate for _, rate, _ in solo or runs),
                      "overhead_s": max((r["wall_s"] - r["executed_flops"] / rate for r, rate, _ in solo), default=None),
                      "peak_gib": max(peak for _, _, peak in runs)}
    return out


def estimate(point: Point, speeds: dict[str, dict]) -> Estimate:
    """A point's estimate from its group's speeds, or conservative defaults."""
    g = speeds.get(point.group)
    if g is None:
        rate = DEFAULT_TFLOPS.get(point.group.rsplit("_", 1)[-1], 100.0) * 1e12
        return Estimate(DEFAULT_OVERHEAD_S, point.budget / rate, DEFAULT_PEAK_GIB)
    overhead = g["overhead_s"] if g["overhead_s"] is not None else DEFAULT_OVERHEAD_S
    return Estimate(overhead, point.budget / g["flops_s"], g["peak_gib"])


def status(points: list[Point], results: Path) -> str:
    """The ledger as a Markdown table: each run finished (card, wall time, final loss) or still to run."""
    speeds = group_speeds(points, results)
    lines = ["| run | budget | state | card | wall s | executed FLOPs | final eval loss |",
             "|---|---|---|---|---|---|---|"]
    left_s, done, other = 0.0, 0, other_settings(points, results)
    for p in points:
        r = read_record(results, p.name)
        if r:
            done += 1
            state = f"done ({r['commit'][:9]})" + (", OTHER SETTINGS" if p.name in other else "")
            lines.append(f"| {p.name} | {p.budget:.0e} | {state} | {r['card']} | {r['wall_s']:.0f} | "
                         f"{r['executed_flops']:.4g} | {r['final_eval_loss']:.5f} |")
        else:
            est = estimate(p, speeds).solo_s
            left_s += est
            holder = claim_holder(results, p.name)
            lines.append(f"| {p.name} | {p.budget:.0e} | to run (~{est:.0f} s alone"
                         f"{f'; claimed by {holder}' if holder else ''}) | | | | |")
    lines.append(f"\n{done} of {len(points)} runs done; ~{left_s / 60:.0f} min of GPU time left at the records' rates, "
                 "one run at a time")
    lines += [f"{name}: made with other settings than the experiment gives it now: {how}" for name, how in other.items()]
    return "\n".join(lines)


def claim_path(results: Path, name: str) -> Path:
    """The lock a runner holds on a point while it runs it (vsa_train/runlock.py), beside the ledger's runs."""
    return results / CLAIMS / f"{name}.lock"


def claim_holder(results: Path, name: str) -> str | None:
    """'host pid N' of the runner that claims a point (alive, or dead and not yet taken over), else None."""
    try:
        record = holder(claim_path(results, name))
    except OSError:  # not a readable file (a folder of that name): still a claim
        return "another runner"
    if record is None:
        return None
    return f"{record['host']} pid {record['pid']}" if "host" in record and "pid" in record else "another runner"
