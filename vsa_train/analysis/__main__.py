"""`python -m vsa_train.analysis RUN_DIR... --out DIR`: frontiers, fits, FLOPs ratios, plots and summary.md.

RUN_DIR may be a run directory, a sweep directory (every run below it) or a wandb offline-run directory.
"""
import argparse
import sys

from .report import analyze
from .runs import find_runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsa_train.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run, sweep or wandb offline-run directories")
    parser.add_argument("--out", required=True, help="output directory for frontier.png, curves.png, summary.md")
    parser.add_argument("--baseline", default="dense", help="attention type the FLOPs ratios are taken against")
    parser.add_argument("--fit-from", type=float, default=0.0, metavar="FLOPS",
                        help="fit only frontier points with at least this many FLOPs (drop the warm-up)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.run_dirs)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(f"{len(runs)} runs: " + ", ".join(f"{r.path.name} ({r.attn}, {r.size})" for r in runs))
    result = analyze(runs, args.out, baseline=args.baseline, fit_from=args.fit_from)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}/summary.md, frontier.png, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
