"""Running a grid's unfinished points inside a time limit, in lanes on one GPU, and keeping the finished ones."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RunDirError
from ..metrics import BUDGET_OVERSHOOT, read_metrics
from ..provenance import code_commit
from ..runlock import hold
from .ledger import (Estimate, Point, claim_path, estimate, group_speeds, other_settings, read_record, speed, status,
                     unfinished)

SAFETY = 1.1             # estimates are multiplied by this before asking whether a run fits (default of --safety)
CLAIM_STALE_S = 120.0    # a claim its runner stopped refreshing (heartbeat every 10 s) is taken over after this
JOB_END_S = 60.0         # --time auto keeps this much of a SLURM job's time for the runner's own end


@dataclass
class Active:
    """A run in progress: its process, when it started, its estimate and the most runs that shared the GPU with it."""

    point: Point
    proc: subprocess.Popen
    est: Estimate
    t0: float = field(default_factory=time.monotonic)
    lanes: int = 1
    work: list[float] = field(default_factory=list)  # [overhead, training] seconds left at its solo rate
    claim: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # closed: the point is let go

    def __post_init__(self):
        self.work = self.work or [self.est.overhead_s, self.est.train_s]


def _next_event(work: list[list[float]]) -> float:
    """Seconds until the next overhead or run ends (inf when nothing is left)."""
    training = sum(1 for o, t in work if o <= 0 < t)
    return min([o for o, _ in work if o > 0] + [t * training for o, t in work if o <= 0 < t], default=float("inf"))


def advance(work: list[list[float]], dt: float) -> None:
    """Advances runs' [overhead, training] seconds left by dt of wall time: overheads (start-up, compilation,
    saves: mostly host work) go on side by side unslowed, and the runs in training share the GPU evenly. This is
    what two lanes measured (docs/benchmarks.md, "Study runs"): 1.38x the throughput, all of it from overlapped
    overheads."""
    while dt > 0:
        step = min(dt, _next_event(work))
        if step == float("inf"):
            return
        training = sum(1 for o, t in work if o <= 0 < t)
        for w in work:
            if w[0] > 0:
                w[0] = 0.0 if w[0] - step < 1e-9 else w[0] - step
            elif w[1] > 0:
                w[1] = 0.0 if w[1] - step / training < 1e-9 else w[1] - step / training
        dt -= step


def end_times(work: list[list[float]]) -> list[float]:
    """Seconds from now until each run ends, by `advance` from one event (an overhead or a run ending) to the next."""
    work = [[max(0.0, o), max(0.0, t)] for o, t in work]
    ends, now = [0.0 if not any(w) else None for w in work], 0.0
    while any(end is None for end in ends):
        step = _next_event(work)
        advance(work, step)
        now += step
        ends = [now if end is None and not any(w) else end for end, w in zip(ends, work)]
    return ends


def machine() -> dict:
    """What runs the grid: the card and its memory (nvidia-smi; "cpu" without one), torch and Triton versions."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
        card, mib = (s.strip() for s in out.split(","))
        memory_gib = float(mib) / 1024
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        card, memory_gib = "cpu", 0.0
    import torch

    try:
        import triton
    except ImportError:  # a CPU install needs none (pyproject.toml)
        return {"card": card, "card_gib": round(memory_gib, 1), "torch": torch.__version__, "triton": "none"}
    return {"card": card, "card_gib": round(memory_gib, 1), "torch": torch.__version__, "triton": triton.__version__}


def slurm_seconds(text: str) -> float | None:
    """Seconds of a SLURM duration as squeue prints it ("[D-]HH:MM:SS", "MM:SS", "MM"); None for UNLIMITED,
    NOT_SET, INVALID or anything else."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not (days == "" or days.isdigit()) or not 1 <= len(parts) <= 3 or not all(x.isdigit() for x in parts):
        return None
    if len(parts) == 1:
        parts = [parts[0], "0"]  # "MM": minutes
    seconds = sum(int(x) * 60 ** i for i, x in enumerate(reversed(parts)))
    return seconds + int(days or 0) * 86400


def job_time_left(end_s: float = JOB_END_S) -> float:
    """`--time auto`: the seconds this SLURM job has left (squeue's %L) less `end_s` for the runner's own end (its
    kills, archive and status); SystemExit outside a job, or where the job has no time limit."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        raise SystemExit("--time auto reads the SLURM job's time left, but SLURM_JOB_ID is not set: give seconds")
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise SystemExit(f"--time auto: squeue did not say job {job}'s time left ({err}): give seconds") from None
    left = slurm_seconds(out.splitlines()[0] if out.strip() else "")
    if left is None:
        raise SystemExit(f"--time auto: job {job} has no time limit (squeue: {out.strip()!r}): give seconds")
    if left <= end_s:
        raise SystemExit(f"--time auto: job {job} has {left:.0f} s left, no more than the runner's own end ({end_s:.0f} s)")
    return left - end_s


def _copy_timestamped(stream, path: Path, t0: float) -> None:
    """Writes a child's output to `path`, each line (and each progress-bar update) prefixed by seconds since start:
    where a run's fixed overhead goes is then readable from its log."""
    with open(path, "a") as log:
        for line in stream:
            for part in line.rstrip("\n").split("\r"):
                if part.strip():
                    log.write(f"[{time.monotonic() - t0:7.1f}s] {part}\n")
            log.flush()


def claim(results: Path, name: str) -> contextlib.ExitStack | None:
    """Holds the point's claim (`claim_path`, a run.lock: stale once its runner is gone) until closed, so that runners
    sharing a ledger (two GPUs, two jobs) never run one point twice; None where another runner holds it."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(hold(claim_path(results, name), CLAIM_STALE_S))
    except RunDirError:
        return None
    return stack


def start(point: Point, experiment: str, extra: list[str], work: Path, est: Estimate,
          held: contextlib.ExitStack | None = None) -> Active:
    """Starts one point from its first step in work/<name> (a leftover directory is deleted: never resume), under
    its claim `held`."""
    run_dir = work / point.name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-u", "train.py", f"experiment={experiment}", *point.overrides, *extra,
           "hydra.mode=RUN", f"hydra.run.dir={run_dir}"]
    log = work / f"{point.name}.out"
    log.write_text(" ".join(cmd) + "\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    active = Active(point, proc, est, claim=held or contextlib.ExitStack())
    threading.Thread(target=_copy_timestamped, args=(proc.stdout, log, active.t0), daemon=True).start()
    return active


def stop(active: Active) -> None:
    """Kills a run and its children (data workers, compile workers): it is discarded, so no graceful save."""
    try:
        os.killpg(active.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    active.proc.wait()


def check_finished(point: Point, run_dir: Path) -> tuple[list[dict], str | None]:
    """The run's metric rows and, if it did not finish as the ledger requires, why not."""
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    if not rows:
        return rows, "no metrics rows"
    flops = rows[-1]["flops"]
    if flops < point.budget:
        return rows, f"stopped at {flops:.4g} FLOPs, short of its budget {point.budget:.4g}"
    if flops > point.budget * (1 + BUDGET_OVERSHOOT):
        return rows, f"overshot its budget: {flops:.4g} FLOPs > {point.budget:.4g} + {BUDGET_OVERSHOOT:.0%}"
    if "eval/loss" not in rows[-1]:
        return rows, "no eval at its last step"
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
    samples_s, _, peak = speed(rows)
    record = {**record, "run": point.name, "group": point.group, "overrides": list(point.overrides),
              "budget": point.budget, "executed_flops": rows[-1]["flops"], "steps": rows[-1]["step"],
              "samples": rows[-1].get("samples"), "samples_per_s": round(samples_s, 3) if samples_s > 0 else None, "peak_gib": round(peak, 2),
              "final_eval_loss": rows[-1]["eval/loss"], "finished": True}
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


def fits(est: Estimate, active: list[Active], left_s: float, memory_gib: float, safety: float = SAFETY) -> bool:
    """Whether a run can start now: its memory beside the running ones', and every run (it and those running)
    still ending before the deadline, its estimate times `safety`, as `advance` shares the GPU."""
    if active and est.peak_gib + sum(a.est.peak_gib for a in active) > memory_gib:
        return False
    ends = end_times([list(a.work) for a in active] + [[est.overhead_s, est.train_s]])
    return all(end * safety <= left_s for end in ends)


def next_point(todo: list[Point], speeds: dict, active: list[Active], left_s: float,
               memory_gib: float, safety: float = SAFETY) -> tuple[Point, Estimate] | None:
    """The longest point that fits now (longest first: big runs need a fresh lease, small ones fill the rest)."""
    for point in sorted(todo, key=lambda p: -estimate(p, speeds).solo_s):
        est = estimate(point, speeds)
        if fits(est, active, left_s, memory_gib, safety):
            return point, est
    return None


def finish(a: Active, args, base: dict, say) -> bool:
    """Checks a run that ended and keeps it in the ledger if it finished; True if kept."""
    rc, wall = a.proc.returncode, time.monotonic() - a.t0
    run_dir = Path(args.work) / a.point.name
    rows, why = check_finished(a.point, run_dir)
    if rc != 0 or why:
        say(f"{a.point.name}: NOT kept after {wall:.0f} s (exit {rc}{', cut at the deadline' if rc == -9 else ''}; "
            f"{why}); log {run_dir}.out")
        return False
    keep(a.point, run_dir, rows, Path(args.results), {**base, "wall_s": round(wall, 1), "lanes": a.lanes,
         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    say(f"{a.point.name}: finished in {wall:.0f} s (lanes {a.lanes}), final eval loss {rows[-1]['eval/loss']:.5f}")
    return True


def _start_next(todo: list[Point], points: list[Point], active: list[Active], args, base: dict, memory_gib: float,
                left: float, say) -> bool:
    """Starts the longest point that fits and that no other runner holds or finished; False if none fits."""
    results = Path(args.results)
    speeds = group_speeds(points, results, base["card"])
    while len(active) < args.lanes:
        pick = next_point(todo, speeds, active, left, memory_gib, args.safety)
        if pick is None:
            return False
        point, est = pick
        todo.remove(point)
        held = claim(results, point.name)
        if held is None or read_record(results, point.name):
            say(f"{point.name}: {'finished' if held else 'being run'} by another runner; skipped")
            if held:
                held.close()
            continue
        active.append(start(point, args.experiment, args.extra, Path(args.work), est, held))
        say(f"{point.name}: started ({' '.join(point.overrides)}; ~{est.solo_s:.0f} s alone), "
            f"{left:.0f} s left, {len(active)} running")
        return True
    return False


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds run(): its runs are stopped and their claims let go


def run(points: list[Point], args, say) -> int:
    """Runs unfinished points until args.time runs out, up to args.lanes at once; 1 if a run failed, 2 if the
    ledger holds runs made with other settings (nothing runs), else 0."""
    deadline = time.monotonic() + args.time
    results, work = Path(args.results), Path(args.work)
    other = other_settings(points, results)
    for name, how in other.items():
        say(f"{name}: made with other settings than this invocation gives it: {how}")
    if other:
        say(f"refused: {results} holds one recipe; run with the settings its runs were made with (the experiment as "
            "it was, the same overrides after `--`), or into another results folder")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    base = {**machine(), "commit": code_commit(Path.cwd()), "extra_overrides": list(args.extra)}
    memory_gib = args.memory_gib or 0.9 * base["card_gib"] or float("inf")
    say(f"grid {args.experiment}: {base}; up to {args.lanes} runs at once in {memory_gib:.0f} GiB, {args.time:.0f} s")
    todo = unfinished(points, results, args.only)
    active: list[Active] = []
    kept, failed = [], 0
    tick = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        while todo or active:
            advance([a.work for a in active], time.monotonic() - tick)  # what the estimates say is left
            tick = time.monotonic()
            for a in [a for a in active if a.proc.poll() is not None or time.monotonic() > deadline]:
                if a.proc.poll() is None:
                    stop(a)
                active.remove(a)
                if finish(a, args, base, say):
                    kept.append(a.point.name)
                    if args.archive:
                        archive(results, kept, Path(args.archive))
                elif a.proc.returncode != -9:
                    failed += 1
                a.claim.close()  # after the record is in place: another runner then sees the point done
            if _start_next(todo, points, active, args, base, memory_gib, deadline - time.monotonic(), say):
                continue
            if not active:
                break
            for a in active:
                a.lanes = max(a.lanes, len(active))
            time.sleep(1.0)
    finally:
        for a in active:  # an exception or SIGTERM: the runs are discarded, the points let go
            stop(a)
            a.claim.close()
            say(f"{a.point.name}: NOT kept (the runner was stopped after {time.monotonic() - a.t0:.0f} s)")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    say(f"{len(kept)} runs finished here, {failed} failed; not started: {', '.join(p.name for p in todo) or 'none'}")
    say(status(points, results))
    return 1 if failed else 0
