"""Host cost of one launch at each layer of the VSA op on a GPU: torch op, Triton kernel, launchers, registered ops.

    python -m vsa_train.bench launch [--reps 2000]

Each row calls the same thing --reps times on tiny tensors (one 256-token head, so the GPU finishes each kernel
long before the host issues the next) and prints the host time per call; the queue is drained after each row.
The Triton rows launch the tile-means forward kernel through Triton's JIT path (`kernel[grid](...)`) and through
its compiled kernel's `run` directly (what a launch would cost without Triton's per-call argument binding). The
difference between a launcher and its registered op is the dispatcher's and torch.library's Python layers (what
eager mode skips: launch.eager_or_registered). Timings compare only within one run.
"""
import argparse
import time

import torch


def per_call_us(fn, reps: int) -> float:
    """Host microseconds per call of fn (after 50 untimed calls), the queue drained before and after."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * elapsed / reps


def rows(reps: int) -> list[tuple[str, float]]:
    from ..ops import pool
    from ..ops.block_sparse.launch import block_sparse_fwd_triton
    from ..ops.launch import BLOCK

    dev, B, S, H, D = "cuda", 1, 256, 1, 64
    n = S // BLOCK
    q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    sizes = torch.full((n,), BLOCK, device=dev, dtype=torch.int32)
    index = torch.arange(n, device=dev, dtype=torch.int32).expand(B, H, n, n).contiguous()  # every tile selected
    count = torch.full((B, H, n), n, device=dev, dtype=torch.int32)
    means = torch.empty(3, B, H, n, D, device=dev, dtype=torch.float32)
    args = (q, k, v, means, sizes, *q.stride(), *k.stride(), *v.stride(), B, H, n)
    constexprs = dict(HEAD_DIM=D, BLOCK=BLOCK)
    grid = (n, B * H, 1)
    compiled = pool.tile_means_fwd_kernel[grid](*args, **constexprs, num_warps=4)
    compiled._init_handles()  # loads the module, as the first JIT launch did
    # CompiledKernel.run takes every parameter in order, constexprs included (Triton's JIT path passes them so too).
    every = (*args, *constexprs.values())

    def direct():
        stream = torch.cuda.current_stream().cuda_stream
        compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *every)

    table = [
        ("torch.empty", lambda: torch.empty(3, B, H, n, D, device=dev)),
        ("one torch op (means.add_(0))", lambda: means.add_(0)),
        ("Triton JIT launch: tile_means_fwd_kernel[grid](...)",
         lambda: pool.tile_means_fwd_kernel[grid](*args, **constexprs, num_warps=4)),
        ("the same compiled kernel's run(...) directly", direct),
        ("launcher pool.tile_means_fwd", lambda: pool.tile_means_fwd(q, k, v, sizes)),
        ("launcher block_sparse_fwd_triton", lambda: block_sparse_fwd_triton(q, k, v, index, count, sizes, 0.125, True)),
        ("registered op block_sparse_fwd, no k2q index",
         lambda: torch.ops.vsa_train.block_sparse_fwd(q, k, v, index, count, sizes, 0.125, False, True, False)),
        ("registered op block_sparse_fwd, with the k2q index (training)",
         lambda: torch.ops.vsa_train.block_sparse_fwd(q, k, v, index, count, sizes, 0.125, True, True, False)),
    ]
    return [(name, per_call_us(fn, reps)) for name, fn in table]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vsa_train.bench launch", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2000)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("vsa_train.bench launch measures CUDA launches: it needs a GPU (none is visible)")
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.reps} calls per row\n\n| what is called | host us per call |\n|---|---|")
    for name, us in rows(args.reps):
        print(f"| {name} | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
