"""The VSA op on a CUDA GPU: full op, fine stage, dense cuDNN SDPA and FlexAttention (medians of do_bench).

    python -m vsa_train.bench op                  # 16K, 32K and 48K tokens: the op tables of docs/benchmarks.md
    python -m vsa_train.bench op --check bf16     # first: errors vs float64 (bf16,fp16,fp32), outputs and grads,
                                                  # and dq with offset keys: Triton centred/uncentred vs dense SDPA
    python -m vsa_train.bench op --profile 16k    # also: GPU kernel time per full-op fwd+bwd, fine vs the rest
    python -m vsa_train.bench op --pairs 0,1      # the Triton rows (and checks) for both kernel loop variants
    SMOKE=1 TRITON_INTERPRET=1 python -m vsa_train.bench op --check fp32   # CPU: tiny sizes, every code path

Rows per size (B=1 or --batch, 12 heads, bf16, 87.5% sparsity): "VSA full op" (raster order in and out: tiling,
coarse stage, top-k, fine stage, coarse gate, untiling), "VSA full op, tiled" (tokens kept in tile order,
as a model that permutes once would), "VSA fine stage" (block_sparse_attention on the full op's selection),
"dense cuDNN" (scaled_dot_product_attention, cuDNN backend), "FlexAttention" (same 64-token block mask).
Effective TFLOP/s count 4*S*S_att*D*H for a forward (S_att = attended keys per query) and 2.5x that for a
backward; speed-up is dense cuDNN's time over the row's time, fwd and fwd+bwd separately. Eager columns
include Python and launch overhead; "graphed" columns replay one CUDA graph of the same call (GPU time).
--pairs runs the Triton rows (and --check, --profile) once per tile pairing given (0: one 64-row tile per
kernel loop iteration, 1: two), each row labelled "(pairs=0)" or "(pairs=1)"; without it, the default
options, unlabelled.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..ops import (
    TileLayout,
    block_sparse_attention,
    coarse_attention,
    topk_tiles,
    video_sparse_attention,
    video_sparse_attention_tiled,
)
from ..ops.block_sparse import launch as block_sparse_launch
from ..ops.launch import BLOCK
from . import accuracy, skew
from .common import DEVICE, SMOKE, card, options_label, pair_options, positive, require_device
from .timing import bench_ms, kernel_profile, time_fwd_bwd

SIZES = {  # name: (video shape (T, H, W) in tokens, head dim)
    "16k": ((16, 32, 32), 64),
    "32k": ((32, 32, 32), 128),
    "48k": ((48, 32, 32), 128),
    "tiny": ((4, 8, 16), 64),  # SMOKE=1 on the CPU: every code path, in seconds
}
HEADS = 12
SPARSITY = 0.875


def make_inputs(name: str, batch: int, skew_: float) -> dict:
    """The size's random inputs (raster and tile order), its selection by the op's own pooling, and its FLOPs."""
    video, D = SIZES[name]
    heads = 1 if SMOKE else HEADS
    dtype = torch.float32 if SMOKE else torch.bfloat16  # the interpreter's bf16 dot is not trustworthy
    layout = TileLayout(video)
    S, n = layout.seq_len, layout.n_tiles
    topk = round(n * (1 - SPARSITY))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, gate = (torch.randn(batch, S, heads, D, device=DEVICE, generator=g, dtype=dtype) for _ in range(4))
    if skew_:
        q, k = skewed(q, k, layout, skew_, g)
    inputs = [t.requires_grad_() for t in (q, k, v, gate)]
    tiled = [layout.to_tiles(t).detach().requires_grad_() for t in inputs]
    sizes = layout.kv_tile_sizes(q.device)
    with torch.no_grad():  # the fine stage alone runs on the selection the full op would make
        q_c, k_c = accuracy.pooled(*tiled[:2], sizes)
        index, count = topk_tiles(coarse_attention(q_c, k_c, k_c, D ** -0.5)[1], topk)
    return {"video": video, "D": D, "heads": heads, "dtype": dtype, "layout": layout, "topk": topk,
            "inputs": inputs, "tiled": tiled, "sizes": sizes, "index": index, "count": count, "batch": batch,
            "fine_flops": 4 * S * topk * BLOCK * D * heads * batch, "dense_flops": 4 * S * S * D * heads * batch}


def op_rows(x: dict, options) -> list:
    """(label, flops, fn, inputs) of the Triton rows at one set of KernelOptions."""
    inputs, tiled, video, topk = x["inputs"], x["tiled"], x["video"], x["topk"]
    return [
        ("VSA full op", x["fine_flops"], lambda: video_sparse_attention(
            *inputs[:3], video, topk, gate_coarse=inputs[3], backend="triton", options=options), inputs),
        ("VSA full op, tiled", x["fine_flops"], lambda: video_sparse_attention_tiled(
            *tiled[:3], x["layout"], topk, gate_coarse=tiled[3], backend="triton", options=options), tiled),
        ("VSA fine stage", x["fine_flops"], lambda: block_sparse_attention(
            *tiled[:3], x["index"], x["count"], x["sizes"], backend="triton", options=options)[0], tiled[:3]),
    ]


def dense_row(x: dict):
    """(fn, inputs) of dense SDPA on the same q, k, v (cuDNN on the GPU)."""
    qh, kh, vh = (t.detach().transpose(1, 2).requires_grad_() for t in x["inputs"][:3])

    def dense():
        if SMOKE:
            return F.scaled_dot_product_attention(qh, kh, vh)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh)

    return dense, [qh, kh, vh]


def print_selection(name: str, x: dict, skew_: float) -> None:
    balance = skew.skew_row(skew.uses_per_key_tile(x["index"], x["layout"].n_tiles))
    print(f"{name}: selection (--skew {skew_}): the most-chosen key tile {balance['max/mean']:.2f}x the mean, "
          f"{100 * balance['unused']:.1f}% of key tiles unused, the top 10% hold {100 * balance['top 10% share']:.0f}% "
          f"of the uses (dK/dV load balance; python -m vsa_train.bench skew)", flush=True)


def table_row(ms: list, flops: float, dense: list) -> tuple[dict, list]:
    """One row's numbers ({fwd_ms, ..., speed-ups, TFLOP/s}: a text cell stays text) and its table cells."""
    row = {"fwd_ms": ms[0], "fwd_bwd_ms": ms[1], "graphed_fwd_ms": ms[2], "graphed_fwd_bwd_ms": ms[3],
           "fwd_flops": flops}
    cells = []
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
    return row, cells


def print_table(name: str, x: dict, times: dict) -> dict:
    """Prints the size's timing table; returns its rows as numbers, {label: table_row's dict}."""
    layout, video = x["layout"], x["video"]
    print(f"\n### {name}: {layout.seq_len} tokens (video {video[0]}x{video[1]}x{video[2]}), D={x['D']}, "
          f"{x['heads']} heads, B={x['batch']}, {str(x['dtype'])[6:]}, topk {x['topk']}/{layout.n_tiles} tiles "
          f"({1 - x['topk'] / layout.n_tiles:.1%} sparse)")
    print("| row | fwd ms | fwd speed-up | fwd TFLOP/s | fwd+bwd ms | fwd+bwd speed-up | fwd+bwd TFLOP/s "
          "| graphed fwd ms | graphed fwd+bwd ms | graphed fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results, dense = {}, times["dense cuDNN SDPA"]
    for label, (*ms, flops) in times.items():
        results[label], cells = table_row(ms, flops, dense)
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return results


def bench_size(name: str, profile: bool, flex: bool, rep_ms: int, settings=None, labelled=False,
               skew: float = 0.0, batch: int = 1) -> dict:
    """Prints the size's timing table (and profiles) for each KernelOptions in settings (default: the defaults);
    returns its rows, {label: {fwd_ms, fwd_bwd_ms, graphed_fwd_ms, graphed_fwd_bwd_ms, fwd_flops, and where
    timed: fwd_speedup, fwd_tflops, fwd_bwd_speedup, fwd_bwd_tflops, graphed_fwd_tflops, graphed_fwd_bwd_tflops,
    graphed_fwd_bwd_speedup}} (speed-ups over dense cuDNN SDPA; TFLOP/s effective, the table's count)."""
    settings = settings or pair_options("")
    x = make_inputs(name, batch, skew)
    print_selection(name, x, skew)
    times = {}
    for options in settings:
        for label, flops, fn, ins in op_rows(x, options):
            times[label + options_label(options, labelled)] = time_fwd_bwd(fn, ins, rep_ms) + (flops,)
    dense, dense_inputs = dense_row(x)
    times["dense cuDNN SDPA"] = time_fwd_bwd(dense, dense_inputs, rep_ms) + (x["dense_flops"],)
    if flex:
        times["FlexAttention (64-token blocks)"] = flex_times(x, rep_ms)
    results = print_table(name, x, times)
    if not SMOKE:  # the configs launched for this head dim and dtype, per tile pairing (launch_tuned's)
        for (kernel, (D_key, dtype_key, pair)), config in block_sparse_launch._TUNED.items():
            if D_key == x["D"] and dtype_key == x["dtype"]:
                print(f"config {kernel.fn.__name__} (pairs={int(pair)}): {config}")
    if profile:
        for options in settings:
            full, tiled = op_rows(x, options)[:2]
            kernel_profile(f"{name} VSA full op (raster order){options_label(options, labelled)}", full[2], full[3])
            kernel_profile(f"{name} VSA full op, tiled{options_label(options, labelled)}", tiled[2], tiled[3])
    return results


def flex_times(x: dict, rep_ms: int) -> tuple:
    """FlexAttention's (fwd, fwd+bwd, -, -, flops), or why it failed in place of the times."""
    tiled = x["tiled"]
    try:
        with torch.no_grad():
            fine_out = block_sparse_attention(*tiled[:3], x["index"], x["count"], x["sizes"], backend="triton")[0]
        fwd, both = flex_rows(*tiled[:3], x["index"], fine_out, rep_ms)
    except Exception as e:  # noqa: BLE001 (report why FlexAttention fails, keep timing the rest)
        print(f"FlexAttention: {type(e).__name__}: {str(e)[:300]}")
        fwd = both = f"fails to compile: {type(e).__name__}"
    return fwd, both, "-", "-", x["fine_flops"]


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
        return chosen[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    # Every selected block is full (video sides are multiples of 4), so all go in the "full" lists.
    mask = BlockMask.from_kv_blocks(torch.zeros_like(num), kv_indices, num, kv_indices, BLOCK_SIZE=BLOCK,
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


def skewed(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, skew: float, g: torch.Generator):
    """(q, k) [B, S, H, D] (raster order) whose coarse scores favour some key tiles in every query tile: a random
    direction a per head is added to every query (x skew), and to every key of tile j a random multiple z_j of it."""
    n, heads, D = layout.n_tiles, q.shape[2], q.shape[3]
    a = torch.randn(heads, D, device=q.device, generator=g) / D ** 0.5  # [H, D]
    z = torch.randn(1, n, 1, 1, device=q.device, generator=g)  # [1, n, 1, 1]: each tile's pull
    pull = layout.from_tiles((z * a).repeat_interleave(layout.padded_len // n, dim=1))  # [1, S, H, D]
    return (q.float() + skew * a).to(q.dtype), (k.float() + skew * pull).to(k.dtype)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vsa_train.bench op", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny" if SMOKE else "16k,32k,48k", help=f"comma-separated of {list(SIZES)}")
    parser.add_argument("--check", default="", help="dtypes to check vs float64 before timing, e.g. bf16,fp16,fp32")
    parser.add_argument("--profile", default="", help="sizes to profile the full op at (comma-separated)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes minutes)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="uneven selections: a query direction that each key tile shares by a random multiple of "
                             "skew; 0 (default): near-uniform; 0.3: like dit_120m's at init (the most-chosen tile "
                             "~6x the mean, `python -m vsa_train.bench skew`), the dK/dV kernel's harder case")
    parser.add_argument("--batch", type=positive, default=1,
                        help="batch size of every row (default 1; the training step runs dit_120m's attention at 4, "
                             "dit_1b's at 2)")
    parser.add_argument("--rep", type=int, default=200, help="ms of timed runs per measurement (do_bench rep)")
    parser.add_argument("--pairs", type=pair_options, default=pair_options(""),
                        help="tile pairings to run the Triton rows and checks with, comma-separated 0 (one tile per "
                             "iteration) / 1 (two), e.g. 0,1; default: the default options, rows unlabelled")
    args = parser.parse_args(argv)
    args.labelled = any(o.tile_pairs is not None for o in args.pairs)
    return args


def main(argv=None):
    args = parse_args(argv)
    require_device("op")
    print(card())
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.check and not accuracy.run_checks([dtypes[d] for d in args.check.split(",")], args.pairs, args.labelled):
        print("continuing to the timings")
    if args.check:
        accuracy.run_offset_checks([dtypes[d] for d in args.check.split(",")], args.pairs, args.labelled)
    for name in args.sizes.split(","):
        start = time.time()
        bench_size(name, name in args.profile.split(","), not args.no_flex, args.rep, args.pairs, args.labelled,
                   args.skew, args.batch)
        print(f"({name} took {time.time() - start:.0f} s including autotuning and compilation)", flush=True)


if __name__ == "__main__":
    main()
