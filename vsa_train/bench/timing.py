"""How the op benchmarks time and profile: do_bench medians, CUDA-graph replays, one fwd+bwd's kernel profile.

Eager timings include Python and launch overhead; graphed ones replay one CUDA graph of the same call (GPU time).
"""
import statistics
import time

import torch
from triton.testing import do_bench

from .common import SMOKE

# The fine-stage kernels; every other GPU kernel of the op is "non-fine" in the profile.
FINE_KERNELS = ("block_sparse_fwd_kernel", "block_sparse_bwd_preprocess_kernel", "block_sparse_bwd_dq_kernel",
                "block_sparse_bwd_dkv_kernel")


def bench_ms(fn, rep_ms, grad_to_none=None) -> float:
    """Median ms of fn: triton's do_bench on the GPU; a few perf_counter runs under SMOKE (CPU)."""
    if not SMOKE:
        return do_bench(fn, warmup=rep_ms // 4, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_fwd_bwd(fn, inputs, rep_ms):
    """Median ms of fn() and of fn() + backward (fn returns one tensor), eager, then replayed as CUDA graphs."""
    grad = torch.randn_like(fn())

    def step():
        fn().backward(grad)

    eager = (bench_ms(fn, rep_ms), bench_ms(step, rep_ms, grad_to_none=inputs))
    return eager + (graphed_ms(fn, inputs, rep_ms), graphed_ms(step, inputs, rep_ms))


def graphed_ms(fn, inputs, rep_ms):
    """Median ms of fn replayed from a CUDA graph: GPU time without Python and launch overhead."""
    if SMOKE:
        return "n/a (CPU)"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        for t in inputs:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay, rep_ms)
    except Exception as e:  # noqa: BLE001 (report why capture fails, keep timing the rest)
        print(f"CUDA graph capture fails: {type(e).__name__}: {str(e)[:300]}")
        return f"graph capture fails: {type(e).__name__}"


def kernel_profile(label: str, fn, inputs):
    """GPU kernel time of one fn() + backward from torch.profiler: per-kernel table and the non-fine share."""
    from torch.profiler import ProfilerActivity, profile

    grad = torch.randn_like(fn())
    iters = 1 if SMOKE else 3

    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad)

    step()
    activity = ProfilerActivity.CPU if SMOKE else ProfilerActivity.CUDA
    with profile(activities=[activity]) as prof:
        for _ in range(iters):
            step()
        if not SMOKE:
            torch.cuda.synchronize()
    kernels = {}  # name: (launches, total us)
    for e in prof.key_averages():
        if SMOKE:  # CPU: the ops' own time stands in for kernel time (exercises the code path only)
            us = e.self_cpu_time_total
        elif e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        else:
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            kernels[e.key] = (e.count, us)
    total = sum(us for _, us in kernels.values()) / iters
    fine = sum(us for name, (_, us) in kernels.items() if name.startswith(FINE_KERNELS)) / iters
    launches = sum(n for n, _ in kernels.values()) / iters
    print(f"\n#### kernel profile: {label}, one fwd+bwd (torch.profiler, mean of {iters})")
    print("| kernel | launches | GPU us | share |")
    print("|---|---|---|---|")
    for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:16]:
        print(f"| {name[:70]} | {n / iters:g} | {us / iters:.1f} | {us / iters / total:.1%} |")
    print(f"\n{label}: GPU time {total:.0f} us per fwd+bwd in {launches:g} kernel launches; fine-stage kernels "
          f"{fine:.0f} us, everything else (tiling, pooling, coarse attention, top-k, k2q index, gates) "
          f"{total - fine:.0f} us = {(total - fine) / total:.1%} non-fine", flush=True)
