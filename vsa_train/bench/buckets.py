"""Step time of each bucket within a mixed-shape run against a single-shape run of that shape, and the first-step cost.

It times the trainer's own optimizer step (`vsa_train.trainer.train_step`, the one train.py runs) on runs built by the
trainer (`build_run`, as `python -m vsa_train.bench step` does), with hand-made batches of each bucket's shape on the
device (the real stream's captions and positions, random videos): the loader is not timed. Rows:

- single: per bucket, a fresh run (data at that shape) whose every step repeats that bucket's batch: its first step
  (compilation included under train.compile) and the median of `--steps` steps after `--warmup`;
- mixed: one fresh run whose steps cycle through the buckets (A, B, C, A, ...): the first step of each bucket (its
  graph compiled inside the mixed run) and each bucket's median step after `--warmup` rounds.

Each step is timed between two device synchronisations. One Markdown table: bucket, tokens, single and mixed median
ms, mixed / single, first step s in each.

    python -m vsa_train.bench buckets --buckets 16x64x64,16x48x80,12x64x64 --out DIR     # dit_120m VSA, compiled
    python -m vsa_train.bench buckets --smoke                                            # CPU: dit_tiny, 3 small
"""
import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from .common import CONFIGS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vsa_train.bench buckets", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model config (dit_120m; dit_tiny with --smoke)")
    p.add_argument("--attn", default="vsa")
    p.add_argument("--buckets", default=None,
                   help="the shapes (frames x height x width of the model input), comma-separated; the first is "
                        "the data's (default 16x64x64,16x48x80,12x64x64; 4x16x16,5x10x14,3x8x20 with --smoke)")
    p.add_argument("--batch", type=int, default=4, help="train.batch_size")
    p.add_argument("--compile", default="true", help="train.compile (true, false, model)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per bucket")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per bucket after its first")
    p.add_argument("--mode", default="all", choices=("all", "mixed", "single"),
                   help="which rows this process runs (scripts/gpu/buckets.sh runs each in a fresh process and "
                        "compile cache, so that no row's first step finds another's graphs)")
    p.add_argument("--out", type=Path, default=None, help="writes <mode>.json here")
    p.add_argument("--table", type=Path, default=None, help="only prints the table of the mixed.json and "
                                                           "single*.json in this folder")
    p.add_argument("--smoke", action="store_true", help="CPU check: dit_tiny, eager, three small shapes, 1 step")
    p.add_argument("override", nargs="*", help="extra Hydra overrides, e.g. attn.sparsity=0.9")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.buckets, args.batch = args.model or "dit_tiny", args.buckets or "4x16x16,5x10x14,3x8x20", 2
        args.compile, args.steps, args.warmup = "false", 1, 0
    args.model, args.buckets = args.model or "dit_120m", args.buckets or "16x64x64,16x48x80,12x64x64"
    args.shapes = [tuple(int(n) for n in b.split("x")) for b in args.buckets.split(",")]
    return args


def build(args, shape):
    """A run built by the trainer with the data at `shape` (its first batch kept as the batches' template)."""
    from ..config_schema import typed
    from ..parallel import allow_graphs
    from ..trainer import build_run, make_accelerator

    allow_graphs(len(args.shapes))  # every bucket its own graph(s), none falling back to eager
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="train", overrides=[
            f"model={args.model}", "data=synthetic", f"attn={args.attn}", f"train.batch_size={args.batch}",
            f"train.compile={args.compile}", "logger=none", f"train.eval_samples={args.batch}",
            "train.eval_timesteps=1", f"data.frames={shape[0]}", f"data.height={shape[1]}", f"data.width={shape[2]}",
            *args.override])
    config = typed(cfg)
    run = build_run(config, make_accelerator(config))
    return run, run.repeat_batch()


def bucket_batch(template: dict, shape) -> dict:
    """The template batch with a random video of `shape` on its device: one bucket's batch."""
    video = template["video"]
    g = torch.Generator(device=video.device).manual_seed(0)
    new = torch.randn((*video.shape[:2], *shape), generator=g, device=video.device, dtype=video.dtype)
    return dict(template, video=new)


def timed_step(run) -> float:
    """Seconds of one trainer step between two device synchronisations."""
    from ..trainer import train_step

    sync(run.accelerator.device)
    t0 = time.perf_counter()
    if not train_step(run).ok:
        raise FloatingPointError(f"non-finite step {run.state.step}: the update was skipped, the timing would be wrong")
    sync(run.accelerator.device)
    return time.perf_counter() - t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def single(args, shape) -> dict:
    """First step and median step of a run of `shape` alone."""
    run, template = build(args, shape)
    try:
        run.train_iter = itertools.repeat(bucket_batch(template, shape))
        first = timed_step(run)
        for _ in range(args.warmup):
            timed_step(run)
        return {"first_s": first, "median_ms": 1e3 * statistics.median(timed_step(run) for _ in range(args.steps))}
    finally:
        run.close()
        torch._dynamo.reset()


def mixed(args) -> dict:
    """First and median step of each bucket within one run cycling through the buckets."""
    run, template = build(args, args.shapes[0])
    try:
        batches = [bucket_batch(template, shape) for shape in args.shapes]
        run.train_iter = itertools.cycle(batches)
        firsts = [timed_step(run) for _ in args.shapes]
        for _ in range(args.warmup * len(args.shapes)):
            timed_step(run)
        times = [[] for _ in args.shapes]
        for k in range(args.steps * len(args.shapes)):
            times[k % len(args.shapes)].append(timed_step(run))
        return {shape: {"first_s": f, "median_ms": 1e3 * statistics.median(t)}
                for shape, f, t in zip(args.shapes, firsts, times)}
    finally:
        run.close()
        torch._dynamo.reset()


def table(args, alone: dict, together: dict, patch=(1, 2, 2)) -> str:
    """The Markdown table of the rows."""
    lines = ["| bucket | tokens | single ms | in mixed ms | mixed / single | first step s (single) | "
             "first step s (mixed) |", "|---|---|---|---|---|---|---|"]
    for shape in args.shapes:
        a, m = alone[shape], together[shape]
        tokens = (shape[0] // patch[0]) * (shape[1] // patch[1]) * (shape[2] // patch[2])
        lines.append(f"| {label(shape)} | {tokens} | {a['median_ms']:.1f} | {m['median_ms']:.1f} | "
                     f"{m['median_ms'] / a['median_ms']:.3f} | {a['first_s']:.1f} | {m['first_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table is not None:
        return print(table_of(args, args.table))
    print(f"model={args.model} attn={args.attn} batch={args.batch} train.compile={args.compile} "
          f"buckets={args.buckets} mode={args.mode} {' '.join(args.override)}", flush=True)
    rows = {}
    if args.mode in ("all", "mixed"):
        rows["mixed"] = mixed(args)
    if args.mode in ("all", "single"):
        rows["single"] = {shape: single(args, shape) for shape in args.shapes}
    if args.mode == "all":
        print(table(args, rows["single"], rows["mixed"]), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for mode, by_shape in rows.items():
            name = mode if mode == "mixed" else f"single_{'_'.join(map(label, args.shapes))}"
            (args.out / f"{name}.json").write_text(json.dumps(
                {label(shape): row for shape, row in by_shape.items()}, indent=1) + "\n")


def label(shape) -> str:
    return "x".join(map(str, shape))


def table_of(args, folder: Path) -> str:
    """The table from a folder of mixed.json and single_*.json (each its own process)."""
    mixed_rows = json.loads((folder / "mixed.json").read_text())
    single_rows = {k: v for f in sorted(folder.glob("single_*.json")) for k, v in json.loads(f.read_text()).items()}
    shapes = [s for s in args.shapes if label(s) in mixed_rows and label(s) in single_rows]
    return table(argparse.Namespace(shapes=shapes), {s: single_rows[label(s)] for s in shapes},
                 {s: mixed_rows[label(s)] for s in shapes})


if __name__ == "__main__":
    main()
