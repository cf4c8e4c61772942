"""Benchmark VSA on a CUDA GPU: full op, fine stage, dense cuDNN SDPA and FlexAttention (medians of do_bench).

    python scripts/bench_vsa.py                 # the table of docs/benchmarks.md ("VSA op")
    python scripts/bench_vsa.py --check bf16    # first: errors vs float64 (bf16,fp16,fp32), outputs and grads
    python scripts/bench_vsa.py --profile 32k   # also: torch.profiler table of one full-op fwd+bwd

Rows per size (B=1, 12 heads, bf16, 87.5% sparsity): "VSA full op" (raster order in and out: tiling,
coarse stage, top-k, fine stage, coarse gate, untiling), "VSA full op, tiled" (tokens kept in tile order,
as a model that permutes once would), "VSA fine stage" (block_sparse_attention on the full op's selection),
"dense cuDNN" (scaled_dot_product_attention, cuDNN backend), "FlexAttention" (same 64-token block mask).
Effective TFLOP/s count 4*S*S_att*D*H for a forward (S_att = attended keys per query) and 2.5x that for a
backward; speed-up is dense cuDNN's time over the row's time, fwd and fwd+bwd separately.
"""
import argparse
import math
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
from vsa_train.ops.block_sparse.bwd import (
    block_sparse_bwd_dkv_kernel,
    block_sparse_bwd_dq_kernel,
)
from vsa_train.ops.block_sparse.fwd import block_sparse_fwd_kernel

SIZES = {  # name: (video shape (T, H, W) in tokens, head dim)
    "16k": ((16, 32, 32), 64),
    "32k": ((32, 32, 32), 128),
    "48k": ((48, 32, 32), 128),
}
HEADS = 12
SPARSITY = 0.875


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def check_fine_stage(dtype, D, qk_mul, B=2, H=4, n_tiles=64, K=16):
    """block_sparse_attention (Triton) vs the float64 reference: ragged counts, edge-tile sizes, strided q/k/v."""
    g = torch.Generator(device="cuda").manual_seed(0)
    S = n_tiles * 64
    # Inputs are rounded to `dtype` first: the float64 reference sees exactly what the kernel sees.
    q, k, v = ((torch.randn(B, H, S, D, device="cuda", generator=g) * m).to(dtype).transpose(1, 2)
               for m in (qk_mul, qk_mul, 1.0))
    index = torch.rand(B, H, n_tiles, n_tiles, device="cuda", generator=g).argsort(-1)[..., :K].int()
    count = torch.randint(1, K + 1, (B, H, n_tiles), device="cuda", generator=g, dtype=torch.int32)
    sizes = torch.randint(1, 65, (n_tiles,), device="cuda", generator=g, dtype=torch.int32)
    g_out = torch.randn(B, S, H, D, device="cuda", generator=g)

    results = []
    for run_dtype, fn in ((dtype, block_sparse_attention), (torch.float64, block_sparse_attention_torch)):
        qkv = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*qkv, index, count, sizes)
        out.backward(g_out.to(run_dtype))
        results.append([out, lse] + [t.grad for t in qkv])
    return [rel_err(got, ref) for got, ref in zip(*results)]


def check_full_op(dtype, D, qk_mul, B=2, H=2, video=(7, 10, 13), topk=8):
    """video_sparse_attention (Triton) vs float64 on an odd video shape, both gates.

    Two references: the float64 naive op (its own selection), and float64 arithmetic on the selection the
    `dtype` coarse stage made (selection is a discrete choice, not differentiable; near-ties of random
    inputs may go either way, which the first comparison mixes in). Returns (errors vs each, agreement).
    """
    g = torch.Generator(device="cuda").manual_seed(1)
    S = math.prod(video)
    q, k, v, gc, gf = ((torch.randn(B, S, H, D, device="cuda", generator=g) * m).to(dtype)
                       for m in (qk_mul, qk_mul, 1, 1, 1))
    g_out = torch.randn(B, S, H, D, device="cuda", generator=g)
    layout = TileLayout(video)
    sizes = layout.kv_tile_sizes(q.device)

    def selection(run_dtype):
        qt, kt = layout.to_tiles(q.to(run_dtype)), layout.to_tiles(k.to(run_dtype))
        scores = coarse_attention(tile_mean(qt, sizes), tile_mean(kt, sizes), tile_mean(kt, sizes), D ** -0.5)[1]
        return topk_tiles(scores, topk)

    index, count = selection(dtype)
    agree = (index.sort(-1).values == selection(torch.float64)[0].sort(-1).values).all(-1).float().mean().item()

    def float64_same_selection(q, k, v, gc, gf):
        qt, kt, vt, gct, gft = (layout.to_tiles(t) for t in (q, k, v, gc, gf))
        o_c, _ = coarse_attention(tile_mean(qt, sizes), tile_mean(kt, sizes), tile_mean(vt, sizes), D ** -0.5)
        o_f, _ = block_sparse_attention_torch(qt, kt, vt, index, count, sizes)
        return layout.from_tiles(combine(o_c, o_f, gct, gft))

    results = []
    for run_dtype, fn in ((dtype, lambda *a: video_sparse_attention(*a[:3], video, topk, a[3], a[4])),
                          (torch.float64, lambda *a: naive_video_sparse_attention(*a[:3], video, topk, a[3], a[4])),
                          (torch.float64, float64_same_selection)):
        args = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v, gc, gf)]
        out = fn(*args)
        out.backward(g_out.to(run_dtype))
        results.append([out] + [t.grad for t in args])
    errs = [[rel_err(got, ref) for got, ref in zip(results[0], other)] for other in results[1:]]
    return errs, agree


def run_checks(dtypes) -> bool:
    print("## correctness vs float64: ||x - ref|| / ||ref||")
    print("(fine: block_sparse_attention vs float64 reference; full: video_sparse_attention vs float64 on the same "
          "tile selection; the naive row's columns are out, dq, dk, dv, dgate_c, dgate_f)")
    print("| op | dtype | D | q,k scale | out | lse | dq | dk | dv | dgate_c | dgate_f | selection |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for dtype in dtypes:
        limit = 1e-3 if dtype == torch.float32 else 1e-2
        for D in (64, 128):
            for qk_mul in (1.0, 4.0):
                for name, check in (("fine", check_fine_stage), ("full", check_full_op)):
                    if name == "full":
                        (naive_errs, errs), agree = check(dtype, D, qk_mul)
                        cells, sel = errs[:1] + [None] + errs[1:], f"same selection as float64 coarse: {agree:.1%}"
                        naive = " | ".join(f"{e:.1e}" for e in naive_errs)
                        print(f"| full vs naive float64 (own selection) | {str(dtype)[6:]} | {D} | x{qk_mul:g} | "
                              f"{naive} | - |")
                    else:
                        errs = check(dtype, D, qk_mul)
                        cells, sel = errs + [None, None], "(given)"
                    ok &= all(e < limit for e in errs)
                    cells = " | ".join("-" if e is None else f"{e:.1e}" for e in cells)
                    print(f"| {name} | {str(dtype)[6:]} | {D} | x{qk_mul:g} | {cells} | {sel} |", flush=True)
    print("all within limits (fp32 < 1e-3, fp16/bf16 < 1e-2)" if ok else "SOME ERRORS OVER THE LIMIT")
    return ok


def time_fwd_bwd(fn, inputs):
    """Median ms of fn() and of fn() + backward (fn returns one tensor), eager, then replayed as CUDA graphs."""
    grad = torch.randn_like(fn())

    def step():
        fn().backward(grad)

    eager = (do_bench(fn, warmup=50, rep=200, return_mode="median"),
             do_bench(step, warmup=50, rep=200, grad_to_none=inputs, return_mode="median"))
    return eager + (graphed_ms(fn, inputs), graphed_ms(step, inputs))


def graphed_ms(fn, inputs):
    """Median ms of fn replayed from a CUDA graph: GPU time without Python and launch overhead."""
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
        return do_bench(graph.replay, warmup=50, rep=200, return_mode="median")
    except Exception as e:  # noqa: BLE001 (report why capture fails, keep timing the rest)
        return f"graph capture fails: {type(e).__name__}"


def flex_rows(q, k, v, q2k_index, fine_out):
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
    fwd = do_bench(lambda: flex(qh, kh, vh, block_mask=mask), warmup=50, rep=200, return_mode="median")
    try:
        _, both, _, _ = time_fwd_bwd(lambda: flex(qh, kh, vh, block_mask=mask), [qh, kh, vh])
    except Exception as e:  # noqa: BLE001 (its backward may not compile for 64-token blocks: NoValidChoicesError)
        print(f"FlexAttention backward: {type(e).__name__}: {str(e)[:300]}")
        both = f"fails to compile: {type(e).__name__}"
    return fwd, both


def bench_size(name: str, profile: bool):
    video, D = SIZES[name]
    layout = TileLayout(video)
    S, n = layout.seq_len, layout.n_tiles
    topk = round(n * (1 - SPARSITY))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, gate = (torch.randn(1, S, HEADS, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4))
    qkv = [t.requires_grad_() for t in (q, k, v)]
    inputs = qkv + [gate.requires_grad_()]
    tiled = [layout.to_tiles(t).detach().requires_grad_() for t in inputs]
    sizes = layout.kv_tile_sizes(q.device)
    with torch.no_grad():  # the fine stage alone runs on the selection the full op would make
        q_c, k_c = tile_mean(tiled[0], sizes), tile_mean(tiled[1], sizes)
        index, count = topk_tiles(coarse_attention(q_c, k_c, k_c, D ** -0.5)[1], topk)
    fine_flops = 4 * S * topk * 64 * D * HEADS
    dense_flops = 4 * S * S * D * HEADS

    rows = [
        ("VSA full op", fine_flops, lambda: video_sparse_attention(*qkv, video, topk, gate_coarse=inputs[3]), inputs),
        ("VSA full op, tiled", fine_flops,
         lambda: video_sparse_attention_tiled(*tiled[:3], layout, topk, gate_coarse=tiled[3]), tiled),
        ("VSA fine stage", fine_flops, lambda: block_sparse_attention(*tiled[:3], index, count, sizes)[0], tiled[:3]),
    ]
    qh, kh, vh = (t.detach().transpose(1, 2).requires_grad_() for t in qkv)

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh)

    rows.append(("dense cuDNN SDPA", dense_flops, dense, [qh, kh, vh]))
    times = {label: time_fwd_bwd(fn, ins) + (flops,) for label, flops, fn, ins in rows}
    if profile:  # where the host time of the fine stage goes (Python, launches, index building)
        import cProfile
        import pstats

        fine = rows[2][2]
        grad = torch.randn_like(fine())
        torch.cuda.synchronize()
        with cProfile.Profile() as prof:
            for _ in range(20):
                fine().backward(grad)
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    try:
        with torch.no_grad():
            fine_out = block_sparse_attention(*tiled[:3], index, count, sizes)[0]
        fwd, both = flex_rows(*tiled[:3], index, fine_out)
    except Exception as e:  # noqa: BLE001 (report why FlexAttention fails, keep timing the rest)
        print(f"FlexAttention: {type(e).__name__}: {str(e)[:300]}")
        fwd = both = f"fails to compile: {type(e).__name__}"
    times["FlexAttention (64-token blocks)"] = (fwd, both, "-", "-", fine_flops)

    dense = times["dense cuDNN SDPA"]
    print(f"\n### {name}: {S} tokens (video {video[0]}x{video[1]}x{video[2]}), D={D}, {HEADS} heads, B=1, bf16, "
          f"topk {topk}/{n} tiles ({SPARSITY:.1%} sparse)")
    print("| row | fwd ms | fwd speed-up | fwd TFLOP/s | fwd+bwd ms | fwd+bwd speed-up | fwd+bwd TFLOP/s "
          "| graphed fwd ms | graphed fwd+bwd ms | graphed fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, (*ms, flops) in times.items():
        cells = []
        for t, base, mult in ((ms[0], dense[0], 1.0), (ms[1], dense[1], 3.5)):
            if isinstance(t, str):
                cells += [t, "-", "-"]
            else:
                cells += [f"{t:.3f}", f"{base / t:.2f}x", f"{flops * mult / t / 1e9:.0f}"]
        cells += [t if isinstance(t, str) else f"{t:.3f}" for t in ms[2:]]
        cells.append(f"{dense[3] / ms[3]:.2f}x" if not isinstance(ms[3], str) and not isinstance(dense[3], str) else "-")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    for kernel in (block_sparse_fwd_kernel, block_sparse_bwd_dq_kernel, block_sparse_bwd_dkv_kernel):
        print(f"autotuned {kernel.fn.__name__}: {kernel.best_config}")

    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        grad = torch.randn_like(q)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                video_sparse_attention(*qkv, video, topk, gate_coarse=inputs[3]).backward(grad)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16k,32k,48k", help=f"comma-separated of {list(SIZES)}")
    parser.add_argument("--check", default="", help="dtypes to check vs float64 before timing, e.g. bf16,fp16,fp32")
    parser.add_argument("--profile", default="", help="sizes to profile the full op at (comma-separated)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_vsa.py needs a CUDA GPU")
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.check and not run_checks([dtypes[d] for d in args.check.split(",")]):
        print("continuing to the timings")
    for name in args.sizes.split(","):
        start = time.time()
        bench_size(name, name in args.profile.split(","))
        print(f"({name} took {time.time() - start:.0f} s including autotuning and compilation)", flush=True)


if __name__ == "__main__":
    main()
