"""`python -m vsa_train.grid run|status|plan EXPERIMENT RESULTS [options] [-- overrides for every run]`."""
import argparse
import sys
from pathlib import Path

from . import __doc__ as doc
from .ledger import grid_points, group_speeds, status
from .plan import plan
from .runner import SAFETY, job_time_left, run


def _say(log: str | None):
    """print, and append to `log` too when given (the lines survive a killed call's output)."""
    def say(line: str) -> None:
        print(line, flush=True)
        if log:
            with open(log, "a") as f:
                f.write(line + "\n")
    return say


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsa_train.grid", description=doc.splitlines()[0],
                                     epilog="Overrides for every run go after `--`: ... -- train.compile=true")
    parser.add_argument("command", choices=("run", "status", "plan"))
    parser.add_argument("experiment", help="a config in configs/experiment/ whose hydra.sweeper.params is the grid")
    parser.add_argument("results", help="the ledger folder: finished runs go to RESULTS/runs/<name>/")
    parser.add_argument("--time", default="540", help="seconds this invocation may run, or 'auto': the time this "
                                                      "SLURM job has left, less a minute (run, plan; default 540)")
    parser.add_argument("--safety", type=float, default=SAFETY,
                        help="start a run only if its estimate times this ends in time (default %(default)s; a run "
                             "cut at the deadline is lost, so go below 1.1 only for a run no call would fit)")
    parser.add_argument("--lanes", type=int, default=1, help="runs at once on the GPU, where memory and time allow")
    parser.add_argument("--memory-gib", type=float, help="memory the lanes may use together (default 90%% of the card)")
    parser.add_argument("--work", default="/tmp/vsa_grid", help="scratch folder for the runs' directories (run)")
    parser.add_argument("--archive", help="also write the runs finished here into this .tgz after each run (run)")
    parser.add_argument("--log", help="also append the runner's lines to this file (run)")
    parser.add_argument("--only", nargs="+", help="only points whose name matches one of these globs, e.g. '*_low'")
    parser.add_argument("--card", help="plan with the records of this card where a group has any (e.g. 'NVIDIA "
                                           "H200'; default: every record, the slowest rate)")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="the config folder (default ./configs)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]
    try:
        args.time = job_time_left() if args.time == "auto" else float(args.time)
    except ValueError:
        parser.error(f"--time takes seconds or 'auto', got {args.time!r}")
    if not args.time > 0:
        parser.error(f"--time must be positive, got {args.time}")
    if args.lanes < 1:
        parser.error(f"--lanes must be at least 1, got {args.lanes}")
    if args.safety < 1:
        parser.error(f"--safety must be at least 1, got {args.safety}")
    points = grid_points(args.experiment, args.configs, args.extra)
    if args.command == "status":
        print(status(points, Path(args.results)))
        return 0
    if args.command == "plan":  # an 80 GB card's 90% unless told
        speeds = group_speeds(points, Path(args.results), args.card)
        print(plan(points, Path(args.results), speeds, args.time, args.lanes, args.memory_gib or 72.0, args.safety,
                   args.only))
        return 0
    return run(points, args, _say(args.log))


if __name__ == "__main__":
    sys.exit(main())
