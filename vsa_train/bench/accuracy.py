"""The op's errors against float64 on the GPU: fine stage, full op, and dq with offset keys (`op --check`).

Inputs are rounded to the checked dtype first, so that the float64 references see exactly what the kernels see.
"""
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..ops import (
    KernelOptions,
    TileLayout,
    block_sparse_attention,
    block_sparse_attention_torch,
    coarse_attention,
    combine,
    naive_video_sparse_attention,
    tile_mean,
    topk_tiles,
    video_sparse_attention,
)
from ..ops.launch import BLOCK
from ..ops.pool import tile_means_fwd
from .common import DEVICE, SMOKE, options_label, rel_err


def pooled(q: torch.Tensor, k: torch.Tensor, sizes: torch.Tensor):
    """(q_c, k_c) [B, n, H, D] fp32 by the op's own pooling kernel: bitwise the means (so the selection) it makes."""
    means = tile_means_fwd(q, k, k, sizes)  # [3, B, H, n, D]
    return means[0].transpose(1, 2), means[1].transpose(1, 2)


def check_fine_stage(dtype, D, qk_mul, options: KernelOptions, B=2, H=4, n_tiles=64, K=16):
    """block_sparse_attention (Triton) vs the float64 reference: ragged counts, edge-tile sizes, strided q/k/v."""
    if SMOKE:  # the Triton interpreter is slow: the smallest problem with ragged counts
        B, H, n_tiles, K = 1, 1, 4, 2
    g = torch.Generator(device=DEVICE).manual_seed(0)
    S = n_tiles * BLOCK
    q, k, v = ((torch.randn(B, H, S, D, device=DEVICE, generator=g) * m).to(dtype).transpose(1, 2)
               for m in (qk_mul, qk_mul, 1.0))
    index = torch.rand(B, H, n_tiles, n_tiles, device=DEVICE, generator=g).argsort(-1)[..., :K].int()
    count = torch.randint(1, K + 1, (B, H, n_tiles), device=DEVICE, generator=g, dtype=torch.int32)
    sizes = torch.randint(1, BLOCK + 1, (n_tiles,), device=DEVICE, generator=g, dtype=torch.int32)
    g_out = torch.randn(B, S, H, D, device=DEVICE, generator=g)

    results = []
    for run_dtype in (dtype, torch.float64):
        qkv = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        if run_dtype == dtype:
            out, lse = block_sparse_attention(*qkv, index, count, sizes, backend="triton", options=options)
        else:
            out, lse = block_sparse_attention_torch(*qkv, index, count, sizes)
        out.backward(g_out.to(run_dtype))
        results.append([out, lse] + [t.grad for t in qkv])
    return [rel_err(got, ref) for got, ref in zip(*results)]


def check_full_op(dtype, D, qk_mul, options: KernelOptions, B=2, H=2, video=(7, 10, 13), topk=8):
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
        q_c, k_c = pooled(qt, kt, sizes) if run_dtype == dtype else (tile_mean(qt, sizes), tile_mean(kt, sizes))
        return topk_tiles(coarse_attention(q_c, k_c, k_c, D ** -0.5)[1], topk)

    index, count = selection(dtype)
    agree = (index.sort(-1).values == selection(torch.float64)[0].sort(-1).values).all(-1).float().mean().item()

    def float64_same_selection(q, k, v, gc, gf):
        qt, kt, vt, gct, gft = (layout.to_tiles(t) for t in (q, k, v, gc, gf))
        o_c, _ = coarse_attention(tile_mean(qt, sizes), tile_mean(kt, sizes), tile_mean(vt, sizes), D ** -0.5)
        o_f, _ = block_sparse_attention_torch(qt, kt, vt, index, count, sizes)
        return layout.from_tiles(combine(o_c, o_f, gct, gft))

    results = []
    for run_dtype, fn in ((dtype, lambda *a: video_sparse_attention(*a[:3], video, topk, a[3], a[4], backend="triton",
                                                                    options=options)),
                          (torch.float64, lambda *a: naive_video_sparse_attention(*a[:3], video, topk, a[3], a[4])),
                          (torch.float64, float64_same_selection)):
        args = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v, gc, gf)]
        out = fn(*args)
        out.backward(g_out.to(run_dtype))
        results.append([out] + [t.grad for t in args])
    errs = [[rel_err(got, ref) for got, ref in zip(results[0], other)] for other in results[1:]]
    return errs, agree


def _dense(q, k, v):
    """Dense SDPA [B, S, H, D]: cuDNN on the GPU for 16-bit inputs, SDPA's own choice for fp32/fp64 or the CPU."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if q.dtype in (torch.float64, torch.float32) or not q.is_cuda:  # cuDNN attention is 16-bit only
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def check_offset_dq(dtype, D, options: KernelOptions, B=1, H=4, video=(8, 16, 16), topk=16, offset=8.0,
                    dense_row=True):
    """dq errors vs float64 when the keys share a large offset, k = randn + offset * u (u a random vector per head,
    as in trained models). Fine stage (block_sparse_attention, a given selection) and full op
    (video_sparse_attention) with keys centred in dQ (KernelOptions.center_keys, the default) and uncentred, and
    dense SDPA on the same q, k, v (unless dense_row is False). Returns {row: (out error, dq error)}."""
    if SMOKE:
        B, H, video, topk = 1, 1, (4, 8, 16), 2
    g = torch.Generator(device=DEVICE).manual_seed(2)
    S = math.prod(video)
    layout = TileLayout(video)
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE, generator=g) for _ in range(3))
    k = (k + offset * torch.randn(H, D, device=DEVICE, generator=g)).to(dtype)
    q, v = q.to(dtype), v.to(dtype)
    g_out = torch.randn(B, S, H, D, device=DEVICE, generator=g)
    sizes, n = layout.kv_tile_sizes(q.device), layout.n_tiles
    index = torch.rand(B, H, n, n, device=DEVICE, generator=g).argsort(-1)[..., :min(topk, n)].int()
    count = torch.full((B, H, n), min(topk, n), device=DEVICE, dtype=torch.int32)

    def fine(q, k, v, opts=None):
        tiled = (layout.to_tiles(t) for t in (q, k, v))
        if q.dtype == torch.float64:
            return layout.from_tiles(block_sparse_attention_torch(*tiled, index, count, sizes)[0])
        return layout.from_tiles(block_sparse_attention(*tiled, index, count, sizes, backend="triton",
                                                        options=opts)[0])

    def full(q, k, v, opts=None):
        if q.dtype == torch.float64:
            return naive_video_sparse_attention(q, k, v, video, topk)
        return video_sparse_attention(q, k, v, video, topk, backend="triton", options=opts)

    def out_and_dq(fn, run_dtype, **kw):
        args = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*args, **kw)
        out.backward(g_out.to(run_dtype))
        return out.detach(), args[0].grad

    rows = {}
    for name, fn in (("fine", fine), ("full", full)):
        ref_out, ref_dq = out_and_dq(fn, torch.float64)
        for centre in (True, False):
            out, dq = out_and_dq(fn, dtype, opts=replace(options, center_keys=centre))
            rows[f"{name}, {'centred' if centre else 'uncentred'}"] = (rel_err(out, ref_out), rel_err(dq, ref_dq))
    if dense_row:
        (ref_out, ref_dq), (out, dq) = out_and_dq(_dense, torch.float64), out_and_dq(_dense, dtype)
        rows["dense SDPA"] = (rel_err(out, ref_out), rel_err(dq, ref_dq))
    return rows


def run_offset_checks(dtypes, settings, labelled, dims=None) -> dict:
    """Prints the offset-keys table; returns {(dtype name, D, row label): (out error, dq error)}. settings: the
    KernelOptions to run with; dims: the head dims (default 64 and 128; 64 alone under SMOKE)."""
    print("## dq with offset keys (k = randn + 8 u per head): ||x - ref|| / ||ref|| vs float64")
    print("| dtype | D | row | out | dq |")
    print("|---|---|---|---|---|")
    results = {}
    for dtype in dtypes:
        for D in dims or ((64,) if SMOKE else (64, 128)):
            for i, options in enumerate(settings):  # the dense row does not depend on the options: once
                rows = check_offset_dq(dtype, D, options, dense_row=i == len(settings) - 1)
                for label, (e_out, e_dq) in rows.items():
                    label += options_label(options, labelled) if label != "dense SDPA" else ""
                    results[(str(dtype)[6:], D, label)] = (e_out, e_dq)
                    print(f"| {str(dtype)[6:]} | {D} | {label} | {e_out:.1e} | {e_dq:.1e} |", flush=True)
    return results


def _check_row(name, dtype, D, qk_mul, options, suffix) -> list[float]:
    """Prints one check's row (and the naive row for the full op); returns the errors held to the limit."""
    if name == "fine":
        errs = check_fine_stage(dtype, D, qk_mul, options)
        cells, sel = errs + [None, None], "(given)"
    else:
        (naive_errs, errs), agree = check_full_op(dtype, D, qk_mul, options)
        cells, sel = errs[:1] + [None] + errs[1:], f"same selection as float64 coarse: {agree:.1%}"
        naive = " | ".join(f"{e:.1e}" for e in naive_errs).replace(" | ", " | - | ", 1)  # no lse column
        print(f"| full vs naive float64 (own selection){suffix} | {str(dtype)[6:]} | {D} | x{qk_mul:g} | {naive} | "
              f"float64's own |")
    cells = " | ".join("-" if e is None else f"{e:.1e}" for e in cells)
    print(f"| {name}{suffix} | {str(dtype)[6:]} | {D} | x{qk_mul:g} | {cells} | {sel} |", flush=True)
    return errs


def run_checks(dtypes, settings, labelled) -> bool:
    """Prints the correctness table of every dtype, head dim, input scale and option set; True if all within limits."""
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
                for options in settings:
                    for name in ("fine", "full"):
                        errs = _check_row(name, dtype, D, qk_mul, options, options_label(options, labelled))
                        ok &= all(e < limit for e in errs)
    print("all within limits (fp32 < 1e-3, fp16/bf16 < 1e-2)" if ok else "SOME ERRORS OVER THE LIMIT")
    return ok
