"""Host (Python + dispatcher + autograd) cost of one VSA call, measured on the CPU with every Triton launch stubbed.

    python -m vsa_train.bench host              # table: ms per fwd and fwd+bwd, raster and tiled paths
    python -m vsa_train.bench host --profile    # also: cProfile of the tiled fwd+bwd, top functions

The kernels run under Triton's interpreter, whose launch entry point (InterpretedFunction.run, a Triton class,
not this library) is replaced for the measurement by one that only counts (outputs stay torch.empty), so what
is timed is the per-call host work that an eager GPU step pays on top of its kernels: autograd nodes,
argument checks, layout lookups, launcher arithmetic, torch ops.
Those torch ops run on small CPU tensors (coarse stage: tiles x tiles) and, where unavoidable, on the
full-size ones (the autograd engine's gradient sums, the CPU-only index checks): the "small" row keeps
them negligible, the "16K" row is the issue's shape. These are host-time proxies, not GPU wall times.
"""
import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # backend="triton" on CPU tensors (no kernel actually runs)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from ..ops import TileLayout, video_sparse_attention, video_sparse_attention_tiled  # noqa: E402

LAUNCHES = {"triton": 0}


@contextlib.contextmanager
def stubbed_launches():
    """Within: every Triton kernel launch (they all go through the interpreter's InterpretedFunction.run) only
    counts itself in LAUNCHES; restored after."""
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("vsa_train.bench host stubs the Triton interpreter's launches: run it with TRITON_INTERPRET=1")
    run = InterpretedFunction.run

    def count(*args, **kwargs):
        LAUNCHES["triton"] += 1

    InterpretedFunction.run = count
    try:
        yield
    finally:
        InterpretedFunction.run = run


class _CountOps(TorchDispatchMode):
    """Counts aten ops that are not views: on a GPU, roughly the torch kernel launches."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def make_call(path, video_shape, heads, dim, topk, dtype, gates):
    """A closure running one fwd+bwd (or fwd only) of the op on fresh leaf inputs."""
    layout = TileLayout(video_shape)
    S = layout.padded_len if path == "tiled" else layout.seq_len
    shape = (1, S, heads, dim)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    gc = torch.randn(shape, dtype=dtype, requires_grad=True) if gates else None
    grad = torch.randn(shape, dtype=dtype)

    def call(backward: bool):
        if path == "tiled":
            out = video_sparse_attention_tiled(q, k, v, layout, topk, gate_coarse=gc, backend="triton")
        else:
            out = video_sparse_attention(q, k, v, video_shape, topk, gate_coarse=gc, backend="triton")
        if backward:
            out.backward(grad)
            for x in (q, k, v, gc):
                if x is not None:
                    x.grad = None

    return call


def time_ms(call, backward: bool, iters: int) -> float:
    """Median wall time of call(backward) in ms over `iters` runs, after two warm-up runs."""
    call(backward), call(backward)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call(backward)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vsa_train.bench host", description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--skip-16k-12h", action="store_true", help="leave out the slow 12-head row")
    parser.add_argument("--dtype", default="float32", choices=("float16", "float32"))
    parser.add_argument("--profile", action="store_true", help="cProfile the tiled fwd+bwd at the tiny shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with stubbed_launches():
        print_table(args)
        if args.profile:
            profile_calls(args)


def print_table(args) -> None:
    dtype = getattr(torch, args.dtype)

    # (label, video_shape, heads): "tiny" is almost pure host work; "16K, 1 head" has the tile count
    # (256 tiles, so the same coarse-stage sizes); "16K, 12 heads" is the shape, where CPU compute of the
    # full-size torch ops (gradient sums, fp16 arithmetic) adds to the host time.
    shapes = [("tiny, 1 head", (4, 8, 8), 1), ("16K, 1 head", (16, 32, 32), 1), ("16K, 12 heads", (16, 32, 32), 12)]
    print(f"host time per call, Triton launches stubbed ({args.dtype}, D=64, topk=32, gate_coarse; CPU proxy)")
    print(f"{'shape':<15} {'path':<7} {'fwd ms':>8} {'fwd+bwd ms':>11} {'triton':>7} {'torch ops':>10}")
    if args.skip_16k_12h:
        shapes = shapes[:2]
    for label, video_shape, heads in shapes:
        for path in ("raster", "tiled"):
            call = make_call(path, video_shape, heads, 64, 32, dtype, gates=True)
            fwd = time_ms(call, False, args.iters)
            both = time_ms(call, True, args.iters)
            LAUNCHES["triton"] = 0
            with _CountOps() as counter:
                call(True)
            print(f"{label:<15} {path:<7} {fwd:8.3f} {both:11.3f} {LAUNCHES['triton']:7d} {counter.count:10d}",
                  flush=True)


def profile_calls(args) -> None:
    """cProfile of 200 tiled fwd+bwd calls at the tiny shape, top functions by own time."""
    call = make_call("tiled", (4, 8, 8), 1, 64, 32, getattr(torch, args.dtype), gates=True)
    call(True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        call(True)
    profiler.disable()
    print("\ncProfile, 200 tiled fwd+bwd calls (tiny, 1 head), by own time:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
