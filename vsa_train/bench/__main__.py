"""`python -m vsa_train.bench <tool> [options]`: runs the tool's main() with the remaining arguments."""
import importlib
import sys

TOOLS = ("op", "step", "goals", "skew", "gaps", "launch", "host", "buckets")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        from . import __doc__ as usage

        sys.exit(f"usage: python -m vsa_train.bench {{{','.join(TOOLS)}}} [options]\n\n{usage}")
    tool = importlib.import_module(f"vsa_train.bench.{argv[0]}")
    sys.argv = [f"python -m vsa_train.bench {argv[0]}", *argv[1:]]  # argparse's prog in usage and errors
    tool.main(argv[1:])


if __name__ == "__main__":
    main()
