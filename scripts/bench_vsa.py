"""Benchmark VSA on a CUDA GPU: full op, fine stage, dense cuDNN SDPA and FlexAttention (medians of do_bench).

    python scripts/bench_vsa.py                 # the table of docs/benchmarks.md ("VSA op")
    python scripts/bench_vsa.py --check bf16    # first: errors vs float64 (bf16,fp16,fp32), outputs and grads,
                                                # and dq with offset keys: Triton centred/uncentred vs dense SDPA
    python scripts/bench_vsa.py --profile 16k   # also: GPU kernel time per full-op fwd+bwd, fine vs the rest
    SMOKE=1 python scripts/bench_vsa.py --check fp32   # CPU (TRITON_INTERPRET=1): tiny sizes, every code path
    python scripts/bench_vsa.py --pairs 0,1     # the Triton rows (and checks) for both kernel loop variants

Rows per size (B=1 or --batch, 12 heads, bf16, 87.5% sparsity): "VSA full op" (raster order in and out: tiling,
coarse stage, top-k, fine stage, coarse gate, untiling), "VSA full op, tiled" (tokens kept in tile order,
as a model that permutes once would), "VSA fine stage" (block_sparse_attention on the full op's selection),
"dense cuDNN" (scaled_dot_product_attention, cuDNN backend), "FlexAttention" (same 64-token block mask).
Effective TFLOP/s count 4*S*S_att*D*H for a forward (S_att = attended keys per query) and 2.5x that for a
backward; speed-up is dense cuDNN's time over the row's time, fwd and fwd+bwd separately. Eager columns
include Python and launch overhead; "graphed" columns replay one CUDA graph of the same call (GPU time).
--pairs runs the Triton rows (and --check, --profile) once per op.TILE_PAIRS setting given (0: one 64-row tile
per kernel loop iteration, 1: two), each row labelled "(TILE_PAIRS=0)" or "(TILE_PAIRS=1)"; without it, the
op's default, unlabelled.
"""
import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from vsa_train.ops import (
    TileLayout,
    block_sparse_attention,
    block_sparse_attention_torch,
    coarse_attention,
    combine,
    naive_video_sparse_attention,
    tile_mean,
    topk_tiles,
    video_sparse_attention,
    video_sparse_attention_tiled,
)
from vsa_train.ops.block_sparse import op as block_sparse_op  # CENTER_KEYS (issue #12), TILE_PAIRS
from vsa_train.ops.pool import tile_means

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import selection_skew  # noqa: E402  (scripts/selection_skew.py: the load-balance figures)

SIZES = {  # name: (video shape (T, H, W) in tokens, head dim)
    "16k": ((16, 32, 32), 64),
    "32k": ((32, 32, 32), 128),
    "48k": ((48, 32, 32), 128),
    "tiny": ((4, 8, 16), 64),  # SMOKE=1 on the CPU: every code path, in seconds
}
HEADS = 12
SPARSITY = 0.875
SMOKE = os.environ.get("SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
# The fine-stage kernels; every other GPU kernel of the op is "non-fine" in the profile.
FINE_KERNELS = ("block_sparse_fwd_kernel", "block_sparse_bwd_preprocess_kernel", "block_sparse_bwd_dq_kernel",
                "block_sparse_bwd_dkv_kernel")


@contextlib.contextmanager
def tile_pairs(setting: bool):
    """op.TILE_PAIRS = setting for the op calls inside (it is read per call), then back to what it was."""
    before = block_sparse_op.TILE_PAIRS
    block_sparse_op.TILE_PAIRS = setting
    try:
        yield
    finally:
        block_sparse_op.TILE_PAIRS = before


def pairs_label(setting: bool, labelled: bool) -> str:
    """The suffix that tells a row's TILE_PAIRS setting apart ("" when --pairs was not given)."""
    return f" (TILE_PAIRS={int(setting)})" if labelled else ""


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (--batch; bench_faster.py's --op-batch)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return int(text)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def check_fine_stage(dtype, D, qk_mul, B=2, H=4, n_tiles=64, K=16):
    """block_sparse_attention (Triton) vs the float64 reference: ragged counts, edge-tile sizes, strided q/k/v."""
    if SMOKE:  # the Triton interpreter is slow: the smallest problem with ragged counts
        B, H, n_tiles, K = 1, 1, 4, 2
    g = torch.Generator(device=DEVICE).manual_seed(0)
    S = n_tiles * 64
    # Inputs are rounded to `dtype` first: the float64 reference sees exactly what the kernel sees.
    q, k, v = ((torch.randn(B, H, S, D, device=DEVICE, generator=g) * m).to(dtype).transpose(1, 2)
               for m in (qk_mul, qk_mul, 1.0))
    index = torch.rand(B, H, n_tiles, n_tiles, device=DEVICE, generator=g).argsort(-1)[..., :K].int()
    count = torch.randint(1, K + 1, (B, H, n_tiles), device=DEVICE, generator=g, dtype=torch.int32)
    sizes = torch.randint(1, 65, (n_tiles,), device=DEVICE, generator=g, dtype=torch.int32)
    g_out = torch.randn(B, S, H, D, device=DEVICE, generator=g)

    results = []
    for run_dtype, fn in ((dtype, block_sparse_attention), (torch.float64, block_sparse_attention_torch)):
        qkv = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*qkv, index, count, sizes, **({"backend": "triton"} if run_dtype == dtype else {}))
        out.backward(g_out.to(run_dtype))
        results.append([out, lse] + [t.grad for t in qkv])
    return [rel_err(got, ref) for got, ref in zip(*results)]


def check_full_op(dtype, D, qk_mul, B=2, H=2, video=(7, 10, 13), topk=8):
    """video_sparse_attention (Triton) vs float64 on an odd video shape, both gates.

    Two references: the float64 naive op (its own selection), and float64 arithmetic on the selection the
    `dtype` coarse stage made (selection is a discrete choice, not differentiable; near-ties of random
    inputs may go either way, which the first comparison mixes in). Returns (errors vs each, agreement).
    """
    if SMOKE:  # the Triton interpreter is slow: few tiles, still edge tiles
        B, H, video, topk = 1, 1, (5, 6, 7), 2
    g = torch.Generator(device=DEVICE).manual_seed(1)
    S = math.prod(video)
    q, k, v, gc, gf = ((torch.randn(B, S, H, D, device=DEVICE, generator=g) * m).to(dtype)
                       for m in (qk_mul, qk_mul, 1, 1, 1))
    g_out = torch.randn(B, S, H, D, device=DEVICE, generator=g)
    layout = TileLayout(video)
    sizes = layout.kv_tile_sizes(q.device)

    def selection(run_dtype):
        qt, kt = layout.to_tiles(q.to(run_dtype)), layout.to_tiles(k.to(run_dtype))
        # The op's own pooling kernel for the kernels' dtype: bitwise the means, hence the selection, it makes.
        q_c, k_c, _ = tile_means(qt, kt, kt, sizes) if run_dtype == dtype else (tile_mean(t, sizes) for t in (qt, kt, kt))
        return topk_tiles(coarse_attention(q_c, k_c, k_c, D ** -0.5)[1], topk)

    index, count = selection(dtype)
    agree = (index.sort(-1).values == selection(torch.float64)[0].sort(-1).values).all(-1).float().mean().item()

    def float64_same_selection(q, k, v, gc, gf):
        qt, kt, vt, gct, gft = (layout.to_tiles(t) for t in (q, k, v, gc, gf))
        o_c, _ = coarse_attention(tile_mean(qt, sizes), tile_mean(kt, sizes), tile_mean(vt, sizes), D ** -0.5)
        o_f, _ = block_sparse_attention_torch(qt, kt, vt, index, count, sizes)
        return layout.from_tiles(combine(o_c, o_f, gct, gft))

    results = []
    for run_dtype, fn in ((dtype, lambda *a: video_sparse_attention(*a[:3], video, topk, a[3], a[4], backend="triton")),
                          (torch.float64, lambda *a: naive_video_sparse_attention(*a[:3], video, topk, a[3], a[4])),
                          (torch.float64, float64_same_selection)):
        args = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v, gc, gf)]
        out = fn(*args)
        out.backward(g_out.to(run_dtype))
        results.append([out] + [t.grad for t in args])
    errs = [[rel_err(got, ref) for got, ref in zip(results[0], other)] for other in results[1:]]
    return errs, agree


def check_offset_dq(dtype, D, B=1, H=4, video=(8, 16, 16), topk=16, offset=8.0, dense_row=True):
    """Issue #12: dq errors vs float64 when the keys share a large offset, k = randn + offset * u (u a random
    vector per head, as in trained models). Fine stage (block_sparse_attention, a given selection) and full op
    (video_sparse_attention) with keys centred in dQ (op.CENTER_KEYS, the default) and uncentred, and dense SDPA
    (cuDNN on the GPU for 16-bit inputs, SDPA's own choice for fp32) on the same q, k, v (unless dense_row is
    False). Returns {row: (out error, dq error)}."""
    if SMOKE:
        B, H, video, topk = 1, 1, (4, 8, 16), 2
    g = torch.Generator(device=DEVICE).manual_seed(2)
    S = math.prod(video)
    layout = TileLayout(video)
    n_tiles = layout.n_tiles
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE, generator=g) for _ in range(3))
    k = (k + offset * torch.randn(H, D, device=DEVICE, generator=g)).to(dtype)
    q, v = q.to(dtype), v.to(dtype)
    g_out = torch.randn(B, S, H, D, device=DEVICE, generator=g)
    sizes = layout.kv_tile_sizes(q.device)
    K = min(topk, n_tiles)
    index = torch.rand(B, H, n_tiles, n_tiles, device=DEVICE, generator=g).argsort(-1)[..., :K].int()
    count = torch.full((B, H, n_tiles), K, device=DEVICE, dtype=torch.int32)

    def fine(q, k, v, backend="triton"):
        fn = block_sparse_attention_torch if q.dtype == torch.float64 else block_sparse_attention
        kw = {} if q.dtype == torch.float64 else {"backend": backend}
        out, _ = fn(*(layout.to_tiles(t) for t in (q, k, v)), index, count, sizes, **kw)
        return layout.from_tiles(out)

    def full(q, k, v):
        if q.dtype == torch.float64:
            return naive_video_sparse_attention(q, k, v, video, topk)
        return video_sparse_attention(q, k, v, video, topk, backend="triton")

    def dense(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if q.dtype in (torch.float64, torch.float32) or not q.is_cuda:  # cuDNN attention is 16-bit only
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

    def out_and_dq(fn, run_dtype):
        args = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*args)
        out.backward(g_out.to(run_dtype))
        return out.detach(), args[0].grad

    rows = {}
    for name, fn in (("fine", fine), ("full", full)) + ((("dense SDPA", dense),) if dense_row else ()):
        ref_out, ref_dq = out_and_dq(fn, torch.float64)
        centres = (True, False) if name != "dense SDPA" else (None,)
        for centre in centres:
            if centre is not None:
                block_sparse_op.CENTER_KEYS = centre
            try:
                out, dq = out_and_dq(fn, dtype)
            finally:
                block_sparse_op.CENTER_KEYS = True
            label = name if centre is None else f"{name}, {'centred' if centre else 'uncentred'}"
            rows[label] = (rel_err(out, ref_out), rel_err(dq, ref_dq))
    return rows


def run_offset_checks(dtypes, settings, labelled, dims=None) -> dict:
    """Prints the offset-keys table; returns {(dtype name, D, row label): (out error, dq error)}. dims: the head
    dims (default 64 and 128; 64 alone under SMOKE)."""
    print("## dq with offset keys (k = randn + 8 u per head; issue #12): ||x - ref|| / ||ref|| vs float64")
    print("| dtype | D | row | out | dq |")
    print("|---|---|---|---|---|")
    results = {}
    for dtype in dtypes:
        for D in dims or ((64,) if SMOKE else (64, 128)):
            for i, setting in enumerate(settings):
                with tile_pairs(setting):  # the dense row does not depend on it: once
                    rows = check_offset_dq(dtype, D, dense_row=i == len(settings) - 1)
                for label, (e_out, e_dq) in rows.items():
                    label += pairs_label(setting, labelled) if label != "dense SDPA" else ""
                    results[(str(dtype)[6:], D, label)] = (e_out, e_dq)
                    print(f"| {str(dtype)[6:]} | {D} | {label} | {e_out:.1e} | {e_dq:.1e} |", flush=True)
    return results


def run_checks(dtypes, settings, labelled) -> bool:
    print("## correctness vs float64: ||x - ref|| / ||ref||")
    print("(fine: block_sparse_attention vs float64 reference; full: video_sparse_attention vs float64 on the same "
          "tile selection; the naive row's columns are out, dq, dk, dv, dgate_c, dgate_f)")
    print("| op | dtype | D | q,k scale | out | lse | dq | dk | dv | dgate_c | dgate_f | selection |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for dtype in dtypes:
        limit = 1e-3 if dtype == torch.float32 else 1e-2
        for D in (64,) if SMOKE else (64, 128):
            for qk_mul in (1.0, 4.0):
                for setting in settings:
                    suffix = pairs_label(setting, labelled)
                    for name, check in (("fine", check_fine_stage), ("full", check_full_op)):
                        with tile_pairs(setting):
                            result = check(dtype, D, qk_mul)
                        if name == "full":
                            (naive_errs, errs), agree = result
                            cells, sel = errs[:1] + [None] + errs[1:], f"same selection as float64 coarse: {agree:.1%}"
                            naive = " | ".join(f"{e:.1e}" for e in naive_errs[:1] + naive_errs[1:])
                            naive = naive.replace(" | ", " | - | ", 1)  # no lse column for the full op
                            print(f"| full vs naive float64 (own selection){suffix} | {str(dtype)[6:]} | {D} | "
                                  f"x{qk_mul:g} | {naive} | float64's own |")
                        else:
                            errs = result
                            cells, sel = errs + [None, None], "(given)"
                        ok &= all(e < limit for e in errs)
                        cells = " | ".join("-" if e is None else f"{e:.1e}" for e in cells)
                        print(f"| {name}{suffix} | {str(dtype)[6:]} | {D} | x{qk_mul:g} | {cells} | {sel} |",
                              flush=True)
    print("all within limits (fp32 < 1e-3, fp16/bf16 < 1e-2)" if ok else "SOME ERRORS OVER THE LIMIT")
    return ok


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


def flex_rows(q, k, v, q2k_index, fine_out, rep_ms):
    """FlexAttention with the same 64-token block mask (all tiles full here): times or the failure."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    B, H, n_tiles, K = q2k_index.shape
    kv_indices = torch.zeros(B, H, n_tiles, n_tiles, dtype=torch.int32, device=q.device)
    kv_indices[..., :K] = q2k_index.sort(-1).values
    num = torch.full((B, H, n_tiles), K, dtype=torch.int32, device=q.device)
    chosen = torch.zeros(B, H, n_tiles, n_tiles, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, q2k_index.long(), True)

    def tile_mask(b, h, q_idx, kv_idx):  # only consulted by eager flex; the compiled kernel reads the blocks
        return chosen[b, h, q_idx // 64, kv_idx // 64]

    # Every selected block is full (video sides are multiples of 4), so all go in the "full" lists.
    mask = BlockMask.from_kv_blocks(torch.zeros_like(num), kv_indices, num, kv_indices, BLOCK_SIZE=64,
                                    mask_mod=tile_mask)
    flex = torch.compile(flex_attention, dynamic=False)
    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    diff = (flex(qh, kh, vh, block_mask=mask).transpose(1, 2) - fine_out).abs().max().item()
    print(f"FlexAttention vs VSA fine stage, max |diff| of outputs: {diff:.2e}")
    fwd = bench_ms(lambda: flex(qh, kh, vh, block_mask=mask), rep_ms)
    try:
        _, both, _, _ = time_fwd_bwd(lambda: flex(qh, kh, vh, block_mask=mask), [qh, kh, vh], rep_ms)
    except Exception as e:  # noqa: BLE001 (its backward may not compile for 64-token blocks: NoValidChoicesError)
        print(f"FlexAttention backward: {type(e).__name__}: {str(e)[:300]}")
        both = f"fails to compile: {type(e).__name__}"
    return fwd, both


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


def skewed(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, skew: float, g: torch.Generator):
    """(q, k) [B, S, H, D] (raster order) whose coarse scores favour some key tiles in every query tile: a random
    direction a per head is added to every query (x skew), and to every key of tile j a random multiple z_j of it."""
    n, heads, D = layout.n_tiles, q.shape[2], q.shape[3]
    a = torch.randn(heads, D, device=q.device, generator=g) / D ** 0.5  # [H, D]
    z = torch.randn(1, n, 1, 1, device=q.device, generator=g)  # [1, n, 1, 1]: each tile's pull
    pull = layout.from_tiles((z * a).repeat_interleave(layout.padded_len // n, dim=1))  # [1, S, H, D]
    return (q.float() + skew * a).to(q.dtype), (k.float() + skew * pull).to(k.dtype)


def bench_size(name: str, profile: bool, flex: bool, rep_ms: int, settings=None, labelled=False,
               skew: float = 0.0, batch: int = 1) -> dict:
    """Prints the size's timing table (and profiles) for each op.TILE_PAIRS setting (default: the op's); returns its rows, {label: {fwd_ms, fwd_bwd_ms, graphed_fwd_ms,
    graphed_fwd_bwd_ms, fwd_flops, and where timed: fwd_speedup, fwd_tflops, fwd_bwd_speedup, fwd_bwd_tflops,
    graphed_fwd_tflops, graphed_fwd_bwd_tflops, graphed_fwd_bwd_speedup}} (speed-ups over dense cuDNN SDPA; TFLOP/s effective, the table's count)."""
    settings = [block_sparse_op.TILE_PAIRS] if settings is None else settings
    video, D = SIZES[name]
    heads = 1 if SMOKE else HEADS
    dtype = torch.float32 if SMOKE else torch.bfloat16  # the interpreter's bf16 dot is not trustworthy
    layout = TileLayout(video)
    S, n = layout.seq_len, layout.n_tiles
    topk = round(n * (1 - SPARSITY))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, gate = (torch.randn(batch, S, heads, D, device=DEVICE, generator=g, dtype=dtype) for _ in range(4))
    if skew:
        q, k = skewed(q, k, layout, skew, g)
    qkv = [t.requires_grad_() for t in (q, k, v)]
    inputs = qkv + [gate.requires_grad_()]
    tiled = [layout.to_tiles(t).detach().requires_grad_() for t in inputs]
    sizes = layout.kv_tile_sizes(q.device)
    with torch.no_grad():  # the fine stage alone runs on the selection the full op would make
        q_c, k_c, _ = tile_means(*tiled[:3], sizes)
        index, count = topk_tiles(coarse_attention(q_c, k_c, k_c, D ** -0.5)[1], topk)
    balance = selection_skew.skew_row(selection_skew.uses_per_key_tile(index, n))
    print(f"{name}: selection (--skew {skew}): the most-chosen key tile {balance['max/mean']:.2f}x the mean, "
          f"{100 * balance['unused']:.1f}% of key tiles unused, the top 10% hold {100 * balance['top 10% share']:.0f}% "
          f"of the uses (dK/dV load balance; scripts/selection_skew.py)", flush=True)
    fine_flops = 4 * S * topk * 64 * D * heads * batch
    dense_flops = 4 * S * S * D * heads * batch

    def full():
        return video_sparse_attention(*qkv, video, topk, gate_coarse=inputs[3], backend="triton")

    def full_tiled():
        return video_sparse_attention_tiled(*tiled[:3], layout, topk, gate_coarse=tiled[3], backend="triton")

    rows = [  # the Triton rows: one per TILE_PAIRS setting
        ("VSA full op", fine_flops, full, inputs),
        ("VSA full op, tiled", fine_flops, full_tiled, tiled),
        ("VSA fine stage", fine_flops,
         lambda: block_sparse_attention(*tiled[:3], index, count, sizes, backend="triton")[0], tiled[:3]),
    ]
    qh, kh, vh = (t.detach().transpose(1, 2).requires_grad_() for t in qkv)

    def dense():
        if SMOKE:
            return F.scaled_dot_product_attention(qh, kh, vh)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh)

    times = {}
    for label, flops, fn, ins in rows:
        for setting in settings:  # the setting is read per call: eager runs and graph capture alike
            with tile_pairs(setting):
                times[label + pairs_label(setting, labelled)] = time_fwd_bwd(fn, ins, rep_ms) + (flops,)
    times["dense cuDNN SDPA"] = time_fwd_bwd(dense, [qh, kh, vh], rep_ms) + (dense_flops,)
    if flex:
        try:
            with torch.no_grad():
                fine_out = block_sparse_attention(*tiled[:3], index, count, sizes, backend="triton")[0]
            fwd, both = flex_rows(*tiled[:3], index, fine_out, rep_ms)
        except Exception as e:  # noqa: BLE001 (report why FlexAttention fails, keep timing the rest)
            print(f"FlexAttention: {type(e).__name__}: {str(e)[:300]}")
            fwd = both = f"fails to compile: {type(e).__name__}"
        times["FlexAttention (64-token blocks)"] = (fwd, both, "-", "-", fine_flops)

    dense = times["dense cuDNN SDPA"]
    print(f"\n### {name}: {S} tokens (video {video[0]}x{video[1]}x{video[2]}), D={D}, {heads} heads, B={batch}, "
          f"{str(dtype)[6:]}, topk {topk}/{n} tiles ({1 - topk / n:.1%} sparse)")
    print("| row | fwd ms | fwd speed-up | fwd TFLOP/s | fwd+bwd ms | fwd+bwd speed-up | fwd+bwd TFLOP/s "
          "| graphed fwd ms | graphed fwd+bwd ms | graphed fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}  # what the table shows, as numbers (a cell that is text stays text)
    for label, (*ms, flops) in times.items():
        cells = []
        row = results[label] = {"fwd_ms": ms[0], "fwd_bwd_ms": ms[1], "graphed_fwd_ms": ms[2],
                                "graphed_fwd_bwd_ms": ms[3], "fwd_flops": flops}
        for key, t, graphed_t, base, mult in (("fwd", ms[0], ms[2], dense[0], 1.0),
                                              ("fwd_bwd", ms[1], ms[3], dense[1], 3.5)):  # a backward: 2.5 forwards
            if not isinstance(graphed_t, str):
                row[f"graphed_{key}_tflops"] = flops * mult / graphed_t / 1e9
            if isinstance(t, str):
                cells += [t, "-", "-"]
            else:
                row[f"{key}_speedup"], row[f"{key}_tflops"] = base / t, flops * mult / t / 1e9
                cells += [f"{t:.3f}", f"{base / t:.2f}x", f"{row[f'{key}_tflops']:.0f}"]
        cells += [t if isinstance(t, str) else f"{t:.3f}" for t in ms[2:]]
        graphed = not isinstance(ms[3], str) and not isinstance(dense[3], str)
        if graphed:
            row["graphed_fwd_bwd_speedup"] = dense[3] / ms[3]
        cells.append(f"{dense[3] / ms[3]:.2f}x" if graphed else "-")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    if not SMOKE:  # the configs launched for this head dim and dtype, per TILE_PAIRS setting (op.launch_tuned's)
        for (kernel, (D_key, dtype_key, pair)), config in block_sparse_op._TUNED.items():
            if D_key == D and dtype_key == dtype:
                print(f"config {kernel.fn.__name__}{pairs_label(pair, labelled)}: {config}")

    if profile:
        for setting in settings:
            with tile_pairs(setting):
                kernel_profile(f"{name} VSA full op (raster order){pairs_label(setting, labelled)}", full, inputs)
                kernel_profile(f"{name} VSA full op, tiled{pairs_label(setting, labelled)}", full_tiled, tiled)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny" if SMOKE else "16k,32k,48k", help=f"comma-separated of {list(SIZES)}")
    parser.add_argument("--check", default="", help="dtypes to check vs float64 before timing, e.g. bf16,fp16,fp32")
    parser.add_argument("--profile", default="", help="sizes to profile the full op at (comma-separated)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes minutes)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="uneven selections: a query direction that each key tile shares by a random multiple of "
                             "skew; 0 (default): near-uniform; 0.3: like dit_120m's at init (the most-chosen tile "
                             "~6x the mean, scripts/selection_skew.py), the dK/dV kernel's harder case")
    parser.add_argument("--batch", type=positive, default=1,
                        help="batch size of every row (default 1; the training step runs dit_120m's attention at 4, "
                             "dit_1b's at 2)")
    parser.add_argument("--rep", type=int, default=200, help="ms of timed runs per measurement (do_bench rep)")
    parser.add_argument("--pairs", default="", help="op.TILE_PAIRS settings to run the Triton rows and checks with, "
                        f"comma-separated 0 (one tile per iteration) / 1 (two), e.g. 0,1; default: the op's "
                        f"({block_sparse_op.TILE_PAIRS!r}), rows unlabelled")
    args = parser.parse_args()
    if args.pairs and not set(args.pairs.split(",")) <= {"0", "1"}:
        parser.error(f"--pairs takes a comma-separated list of 0 and 1, got {args.pairs!r}")
    settings = [p == "1" for p in args.pairs.split(",")] if args.pairs else [block_sparse_op.TILE_PAIRS]
    labelled = bool(args.pairs)
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("bench_vsa.py needs a CUDA GPU (or SMOKE=1 with TRITON_INTERPRET=1 for a CPU smoke run)")
    if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("SMOKE=1 runs the Triton kernels on the CPU: set TRITON_INTERPRET=1 too")
    import triton

    card = "CPU smoke run (Triton interpreter)" if SMOKE else torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.check and not run_checks([dtypes[d] for d in args.check.split(",")], settings, labelled):
        print("continuing to the timings")
    if args.check:
        run_offset_checks([dtypes[d] for d in args.check.split(",")], settings, labelled)
    for name in args.sizes.split(","):
        start = time.time()
        bench_size(name, name in args.profile.split(","), not args.no_flex, args.rep, settings, labelled, args.skew,
                   args.batch)
        print(f"({name} took {time.time() - start:.0f} s including autotuning and compilation)", flush=True)


if __name__ == "__main__":
    main()
