"""A ledger-driven runner for a sweep that outlasts any one machine lease: run what fits, keep what finished.

    python -m vsa_train.grid status EXPERIMENT RESULTS            # the ledger: finished runs and what remains
    python -m vsa_train.grid run EXPERIMENT RESULTS --time 540    # run the next unfinished runs that fit in 540 s

The grid is the experiment's own sweep (`hydra.sweeper.params` of configs/experiment/EXPERIMENT.yaml: a product
of comma-separated choices), so `python train.py experiment=EXPERIMENT` on a cluster runs the same points. Each
point is one `python train.py experiment=EXPERIMENT key=value ...` in a scratch directory, started from scratch
(never resumed: a run either finishes inside one invocation or is run again from its start, so no run mixes
halves made on different code or cards). A run that finishes with its FLOPs budget reached (within +2%) is
copied into RESULTS/runs/<name>/ as metrics.jsonl, config.yaml and record.json (commit, card, versions, wall
time, executed FLOPs, final eval loss); that folder is the ledger, meant to be committed, and holds no
checkpoints. A run is started only when its estimated wall time (from the records of its model and attention,
or a default rate) fits in the time left, so runs are not cut at the end of a lease; one that is cut anyway is
discarded and said so.
"""
import argparse
import fnmatch
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .metrics import read_metrics

BUDGET_TOLERANCE = 0.02  # a run may overshoot its budget by its last step, never by more than this
OVERHEAD_S = 60.0        # start-up, compilation, data workers, evals and the final save, per run (a guess)
SAFETY = 1.15            # estimates are multiplied by this before asking whether a run fits
DEFAULT_TFLOPS = {"dense": 250.0, "vsa": 150.0}  # executed TFLOP/s before any record exists (conservative)


@dataclass(frozen=True)
class Point:
    """One run of the grid: its command-line choices and the budget they resolve to."""

    name: str
    overrides: tuple[str, ...]
    group: str        # model and attention: the runs that share a speed
    budget: float


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
            budget = cfg.train.flops_budget
            if budget is None:
                raise SystemExit(f"{experiment} {' '.join(overrides)}: no train.flops_budget; the runner needs one")
            points.append(Point("_".join(values), overrides, f"{cfg.model.name}_{cfg.attn.name}", float(budget)))
    return points


def read_record(results: Path, name: str) -> dict | None:
    """The record of a finished run, or None (absent or unreadable: the run counts as not done)."""
    try:
        record = json.loads((results / "runs" / name / "record.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("finished") is True else None


def estimate_s(point: Point, records: list[dict]) -> float:
    """Wall time of a run: OVERHEAD_S plus its budget at the fastest rate its group's records showed."""
    rates = [r["executed_flops"] / (r["wall_s"] - OVERHEAD_S) for r in records
             if r.get("group") == point.group and r.get("wall_s", 0) > OVERHEAD_S + 10]
    attn = point.group.rsplit("_", 1)[-1]
    rate = min(rates) if rates else DEFAULT_TFLOPS.get(attn, 100.0) * 1e12
    return OVERHEAD_S + point.budget / rate


def status(points: list[Point], results: Path) -> str:
    """The ledger as a Markdown table: each run finished (card, wall time, final loss) or still to run."""
    records = {p.name: read_record(results, p.name) for p in points}
    done = [r for r in records.values() if r]
    lines = ["| run | budget | state | card | wall s | executed FLOPs | final eval loss |", "|---|---|---|---|---|---|---|"]
    left_s = 0.0
    for p in points:
        r = records[p.name]
        if r:
            lines.append(f"| {p.name} | {p.budget:.0e} | done ({r['commit'][:9]}) | {r['card']} | {r['wall_s']:.0f} | "
                         f"{r['executed_flops']:.4g} | {r['final_eval_loss']:.5f} |")
        else:
            est = estimate_s(p, done)
            left_s += est
            lines.append(f"| {p.name} | {p.budget:.0e} | to run (~{est:.0f} s) | | | | |")
    lines.append(f"\n{len(done)} of {len(points)} runs done; ~{left_s / 60:.0f} min of GPU time left by the records' "
                 "rates (one run per call: the longest must fit in one)")
    return "\n".join(lines)


def machine() -> dict:
    """What runs the grid: the card (nvidia-smi's name, or "cpu") and the torch and Triton versions."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip().splitlines()
        card = out[0].strip() if out else "cpu"
    except (OSError, subprocess.SubprocessError):
        card = "cpu"
    import torch
    import triton

    return {"card": card, "torch": torch.__version__, "triton": triton.__version__}


def commit_of(repo: Path) -> str:
    """The code's commit: $GRID_COMMIT (a copied tree has no .git), else git's HEAD, marked when files differ."""
    if os.environ.get("GRID_COMMIT"):
        return os.environ["GRID_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def launch(point: Point, experiment: str, extra: list[str], work: Path, limit_s: float) -> tuple[int, float]:
    """Runs one point from scratch in work/<name> for at most limit_s; (exit code, wall seconds); 124: cut."""
    run_dir = work / point.name
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume a half: a run starts from its first step
    cmd = [sys.executable, "-u", "train.py", f"experiment={experiment}", *point.overrides, *extra,
           "hydra.mode=RUN", f"hydra.run.dir={run_dir}"]
    t0 = time.monotonic()
    with open(work / f"{point.name}.out", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run is discarded anyway: no graceful save needed
            proc.wait()
            rc = 124
    return rc, time.monotonic() - t0


def check_finished(point: Point, run_dir: Path) -> tuple[list[dict], str | None]:
    """The run's metric rows and, if it did not finish as the ledger requires, why not."""
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    if not rows:
        return rows, "no metrics rows"
    flops = rows[-1]["flops"]
    if flops < point.budget:
        return rows, f"stopped at {flops:.4g} FLOPs, short of its budget {point.budget:.4g}"
    if flops > point.budget * (1 + BUDGET_TOLERANCE):
        return rows, f"overshot its budget: {flops:.4g} FLOPs > {point.budget:.4g} + {BUDGET_TOLERANCE:.0%}"
    if not any("eval/loss" in r for r in rows if r["flops"] >= point.budget):
        return rows, "no final eval at its budget"
    if not (run_dir / "config.yaml").exists():
        return rows, "no config.yaml"
    return rows, None


def keep(point: Point, run_dir: Path, rows: list[dict], results: Path, record: dict) -> None:
    """Copies a finished run's files into results/runs/<name>/ (a new folder renamed into place: all or none)."""
    final = results / "runs" / point.name
    tmp = final.with_name(f".{point.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
    shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
    evals = [r for r in rows if "eval/loss" in r]
    record = {**record, "run": point.name, "group": point.group, "overrides": list(point.overrides),
              "budget": point.budget, "executed_flops": rows[-1]["flops"], "steps": rows[-1]["step"],
              "final_eval_loss": evals[-1]["eval/loss"], "finished": True}
    (tmp / "record.json").write_text(json.dumps(record, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def archive(results: Path, names: list[str], path: Path) -> None:
    """Writes the runs finished in this invocation into a .tgz (rewritten after each run: a kill keeps the rest)."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            tar.add(results / "runs" / name, arcname=f"runs/{name}")
    tmp.replace(path)


def next_point(points: list[Point], results: Path, only: list[str] | None, left_s: float,
               tried: set[str]) -> tuple[Point | None, list[str]]:
    """The longest unfinished point whose estimate fits in left_s (longest first: the big runs need a fresh
    lease, the small ones fill what is left), and a line for each one skipped as too long."""
    records = [r for p in points if (r := read_record(results, p.name))]
    todo = [p for p in points if p.name not in tried and not read_record(results, p.name)
            and (not only or any(fnmatch.fnmatch(p.name, pattern) for pattern in only))]
    skipped = []
    for point in sorted(todo, key=lambda p: -estimate_s(p, records)):
        est = estimate_s(point, records)
        if est * SAFETY <= left_s:
            return point, skipped
        skipped.append(f"{point.name}: not started, ~{est:.0f} s estimated x {SAFETY} > {left_s:.0f} s left")
    return None, skipped


def run(args) -> int:
    """Runs the unfinished points that fit in args.time seconds; returns 0 unless a run failed."""
    deadline = time.monotonic() + args.time
    points = grid_points(args.experiment, args.configs, args.extra)
    results, work = Path(args.results), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = {**machine(), "commit": commit_of(Path.cwd()), "extra_overrides": args.extra}
    say = print if args.log is None else _tee(args.log)
    say(f"grid {args.experiment}: {base}")
    finished, tried, failed = [], set(), 0
    while True:
        left = deadline - time.monotonic()
        point, skipped = next_point(points, results, args.only, left, tried)
        if point is None:
            say("\n".join(skipped) or "no unfinished run left")
            break
        tried.add(point.name)
        say(f"{point.name}: started ({' '.join(point.overrides)}), {left:.0f} s left")
        rc, wall = launch(point, args.experiment, args.extra, work, left)
        rows, why = check_finished(point, work / point.name)
        if rc != 0 or why:
            failed += rc != 124
            say(f"{point.name}: NOT kept after {wall:.0f} s (exit {rc}{', cut at the deadline' if rc == 124 else ''}; "
                f"{why}); log {work / (point.name + '.out')}")
            continue
        keep(point, work / point.name, rows, results, {**base, "wall_s": round(wall, 1),
             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        finished.append(point.name)
        say(f"{point.name}: finished in {wall:.0f} s, final eval loss {read_record(results, point.name)['final_eval_loss']:.5f}")
        if args.archive:
            archive(results, finished, Path(args.archive))
    say(f"{len(finished)} runs finished here, {failed} failed\n" + status(points, results))
    return 1 if failed else 0


def _tee(path: str):
    def say(line: str) -> None:
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return say


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsa_train.grid", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "status"))
    parser.add_argument("experiment", help="a config in configs/experiment/ whose hydra.sweeper.params is the grid")
    parser.add_argument("results", help="the ledger folder: finished runs go to RESULTS/runs/<name>/")
    parser.add_argument("--time", type=float, default=540.0, help="seconds this invocation may run (run)")
    parser.add_argument("--work", default="/tmp/vsa_grid", help="scratch folder for the runs' directories (run)")
    parser.add_argument("--archive", help="also write the runs finished here into this .tgz after each run (run)")
    parser.add_argument("--log", help="also append the runner's lines to this file (run)")
    parser.add_argument("--only", nargs="+", help="only points whose name matches one of these globs (run), e.g. '*_low'")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="the config folder (default ./configs)")
    parser.epilog = "Overrides for every run go after `--`: ... -- train.compile=true train.compile_cache=/tmp/cc"
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]
    if args.command == "status":
        print(status(grid_points(args.experiment, args.configs, args.extra), Path(args.results)))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
