"""`python -m vsa_train.analysis RUN_DIR... --out DIR`: frontiers, fits, FLOPs multipliers with bootstrap
intervals, isoFLOP parabolas, per-timestep frontiers, plots and summary.md.

RUN_DIR may be a run directory or a sweep directory (every run below it, found by its metrics.jsonl, which the
trainer always writes), or `wandb:<entity>/<project>[/<group>]` for online wandb runs (read through wandb's
public API). Offline wandb runs are read from their run directories' metrics.jsonl. A directory that is not a
readable run, or a run that cannot be compared with the rest, is left out with one line on stderr (and in
summary.md's notes); the bootstrap's seed is fixed, so the outputs are the same on every run.
"""
import argparse
import sys
from pathlib import Path

from .report import analyze
from .find import find_runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsa_train.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run or sweep directories, or wandb:<entity>/<project>[/<group>]")
    parser.add_argument("--out", required=True, help="output directory for summary.md and the plots")
    parser.add_argument("--baseline", default="dense", help="attention type the FLOPs ratios are taken against")
    parser.add_argument("--fit-from", type=float, default=0.0, metavar="FLOPS",
                        help="fit only frontier points with at least this many FLOPs (drop the warm-up)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the multiplier's confidence interval (0: none)")
    parser.add_argument("--all-points", action="store_true",
                        help="frontiers from every eval point of runs with a decaying schedule too (default: their "
                             "final point only; earlier points were not annealed)")
    args = parser.parse_args(argv)
    notes = []
    try:
        runs = find_runs(args.run_dirs, notes=notes)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err) + "".join(f"\n  {note}" for note in notes))
    counts = {}
    for run in runs:
        counts[run.attn] = counts.get(run.attn, 0) + 1
    print(f"{len(runs)} runs found (" + ", ".join(f"{attn}: {n}" for attn, n in sorted(counts.items())) + ")")
    result = analyze(runs, args.out, baseline=args.baseline, fit_from=args.fit_from, resamples=args.bootstrap,
                     all_points=args.all_points, notes=notes)
    for note in dict.fromkeys(result["notes"]):
        print(f"note: {note}", file=sys.stderr)
    out = Path(args.out)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    for line in (out / "summary.md").read_text().splitlines():
        if line.startswith("**Verdict"):
            print(line)
    return 0

if __name__ == "__main__":
    sys.exit(main())
