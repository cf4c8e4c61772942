"""Triton backward kernels of block-sparse attention: delta preprocess, dQ per query tile, dK/dV per key tile.

No atomics: dQ sums over a query tile's key tiles (q2k index), dK/dV over the query tiles that selected a
key tile (the k2q index of index.py), each in one program, so results are deterministic.

PAIR (KernelOptions.tile_pairs): the dQ and dK/dV loops take two tiles per iteration (two key tiles, resp. two query tiles
of the k2q list), gathered into one block of 128 rows: 64 x 128 products, half the iterations; else one tile.
"""
import triton
import triton.language as tl

from .configs import bwd_configs
from .fwd import key_rows

LOG2E = tl.constexpr(1.4426950408889634)


# Size arguments are not specialised on (== 1, divisible by 16): one compile serves every video size.
@triton.jit(do_not_specialize=["n_heads", "seq_len"])
def block_sparse_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,  # [B, S, H, D] x2 (any strides), DLSE/DELTA [B, H, S] fp32 contiguous
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    n_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE: the softmax-backward row term (dLSE enters because dlse/ds = p)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_m = tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_ptr = bh.to(tl.int64) * seq_len + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_ptr)
    tl.store(DELTA + row_ptr, delta)


@triton.jit
def centred_dq(dq, ds_sums, shift, DLSE_ROWS, HAS_DLSE: tl.constexpr):
    """rounded(dS) @ K minus its row sums times kshift is rounded(dS) @ (K - kshift), to fp32 rounding: the
    products and sums were exact to fp32, so the offset's part cancels here, not in 16 bits. Then + dLSE kshift."""
    ds_sum = tl.max(ds_sums, 1)  # [BLOCK]: the 16 columns hold the same sum
    dq -= ds_sum[:, None] * shift[None, :]
    if HAS_DLSE:
        dq += tl.load(DLSE_ROWS)[:, None] * shift[None, :]
    return dq


# HAS_SHIFT (KernelOptions.center_keys): dQ = scale * (sum dS @ (K - kshift) + dLSE kshift), exact because each row
# of dS sums to dLSE (to 0 without an LSE gradient). With keys sharing a large offset, the rounding of dS to
# 16 bits, times the offset, is the whole dq error of dS @ K; in dS @ (K - kshift) the offset is gone. It is
# computed as dS @ K - rowsum(dS) kshift on the same rounded dS (centred_dq), with no per-tile centring of K; the
# row sums of dS as rounded for the product come from the tensor cores (dS @ ones: exact products, fp32 sums, like
# dS @ K; every column holds the row sum), cheaper than a tl.sum per iteration on the CUDA cores. The logits use
# K as given.
@triton.autotune(configs=bwd_configs(), key=["HEAD_DIM", "DOT_PRECISION", "PAIR"])
@triton.jit(do_not_specialize=["n_heads", "n_tiles", "max_k"])
def block_sparse_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,          # [B, S, H, D] x5 (any strides); LSE, DELTA [B, H, S] fp32
    Q2K_INDEX, Q2K_COUNT, KV_TILE_SIZES,  # int32 [B*H, n_tiles, max_k], [B*H, n_tiles], [n_tiles]
    KSHIFT, DLSE,                         # HAS_SHIFT: fp32 [B*H, D]; HAS_SHIFT and HAS_DLSE: fp32 [B, H, S] contiguous
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    n_heads, n_tiles, max_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_DLSE: tl.constexpr, PAIR: tl.constexpr,
):
    """One program = one query tile: dQ = scale * sum over its key tiles of dS @ K (PAIR: two key tiles per
    iteration, entries c and c + 1 of its index, as in the forward); keys centred with HAS_SHIFT (above)."""
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), bh % n_heads
    qk_scale_log2 = sm_scale * LOG2E

    # Annotated: the loop step must stay a constexpr (the interpreter makes a plain assignment a tensor).
    STEP: tl.constexpr = 2 if PAIR else 1  # key tiles per iteration
    offs_m = q_tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod)
    row_ptr = bh.to(tl.int64) * n_tiles * BLOCK + offs_m
    lse_log2 = tl.load(LSE + row_ptr) * LOG2E
    delta = tl.load(DELTA + row_ptr)
    # K and V are loaded transposed ([D, BLOCK_N]) for the logits and dP; K row-major again for dS @ K.
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    row = bh * n_tiles + q_tile
    count = tl.load(Q2K_COUNT + row)
    index_ptr = Q2K_INDEX + row.to(tl.int64) * max_k
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    if HAS_SHIFT:
        shift = tl.load(KSHIFT + bh.to(tl.int64) * HEAD_DIM + offs_d)  # [D] fp32
    ds_sums = tl.zeros([BLOCK, 16], tl.float32)  # HAS_SHIFT: rounded dS @ ones
    ones = tl.full([BLOCK * STEP, 16], 1.0, K.dtype.element_ty)
    for c in range(0, count, STEP):
        offs_kv, real, _ = key_rows(index_ptr, c, count, KV_TILE_SIZES, BLOCK, PAIR)  # as the forward walks them
        k = tl.load(k_base + offs_kv[:, None] * stride_ks + offs_d[None, :] * stride_kd)  # [BLOCK_N, D]
        vt = tl.load(v_base + offs_kv[None, :] * stride_vs + offs_d[:, None] * stride_vd)  # [D, BLOCK_N]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK, BLOCK_N]
        s = tl.where(real[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse_log2[:, None])  # 0 at pad and empty-slot columns
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)  # [BLOCK, BLOCK_N]
        ds = (p * (dp - delta[:, None])).to(k.dtype)  # [BLOCK, BLOCK_N]; 0 where p is (dp is finite)
        if HAS_SHIFT:
            ds_sums = tl.dot(ds, ones, ds_sums, input_precision=DOT_PRECISION)  # [BLOCK, 16]
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)  # exact products, fp32 sums

    if HAS_SHIFT:
        dq = centred_dq(dq, ds_sums, shift, DLSE + row_ptr, HAS_DLSE)
    # The softmax scale is applied in fp32 here, never folded into low-precision K.
    dq *= sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))


@triton.jit
def query_rows(q_tiles_ptr, c, end, second, col, BLOCK: tl.constexpr, PAIR: tl.constexpr):
    """The query rows of loop iteration c over a key tile's k2q list, and which are used: ([BLOCK_M] row offsets,
    [BLOCK_M] mask), BLOCK_M = BLOCK (entry c) or 2 * BLOCK with PAIR (entries c and c + 1, gathered; second and
    col: whether a row is the pair's second tile's, and its row within its tile)."""
    q_tile = tl.load(q_tiles_ptr + c)
    if PAIR:
        # An odd count's last pair has an empty second slot: it reloads the first query tile (in bounds:
        # entries past `end` may be unwritten) and masks its logits to -inf; with that tile's finite lse,
        # its probabilities are exactly 0, so it adds nothing to dK or dV.
        q_tile2 = tl.load(q_tiles_ptr + tl.minimum(c + 1, end - 1))
        offs_q = tl.where(second, q_tile2, q_tile) * BLOCK + col  # [BLOCK_M] gathered query rows
        used = ~second | (c + 1 < end)                            # [BLOCK_M]
    else:
        offs_q = q_tile * BLOCK + col  # [BLOCK_M]
        used = col >= 0
    return offs_q, used


@triton.autotune(configs=bwd_configs(), key=["HEAD_DIM", "DOT_PRECISION", "PAIR"])
@triton.jit(do_not_specialize=["n_heads", "n_tiles", "k2q_width"])
def block_sparse_bwd_dkv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,          # [B, S, H, D] x6 (any strides); LSE, DELTA [B, H, S] fp32
    K2Q_OFFSETS, K2Q_Q_TILES, KV_TILE_SIZES,  # int32 [B*H, n_tiles + 1], [B*H, width], [n_tiles]
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    n_heads, n_tiles, k2q_width, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, PAIR: tl.constexpr,
):
    """One program = one key tile: dV = sum P^T @ dO, dK = scale * sum dS^T @ Q over the query tiles that chose it
    (PAIR: two of them per iteration, entries c and c + 1 of its k2q list, gathered into one block of 2 * BLOCK)."""
    kv_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), bh % n_heads
    qk_scale_log2 = sm_scale * LOG2E

    STEP: tl.constexpr = 2 if PAIR else 1  # query tiles per iteration
    BLOCK_M: tl.constexpr = BLOCK * STEP  # query rows per iteration
    offs_kv = kv_tile * BLOCK + tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_kv[:, None] * stride_ks + offs_d[None, :] * stride_kd)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_kv[:, None] * stride_vs + offs_d[None, :] * stride_vd)
    # Pad key rows get probability 0 from every query, hence dK = dV = 0 there.
    real_key = tl.arange(0, BLOCK) < tl.load(KV_TILE_SIZES + kv_tile)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = bh.to(tl.int64) * n_tiles * BLOCK
    second = offs_m >= BLOCK                        # [BLOCK_M]: row of a pair's second query tile (none without PAIR)
    col = tl.where(second, offs_m - BLOCK, offs_m)  # [BLOCK_M]: row within its query tile

    start = tl.load(K2Q_OFFSETS + bh * (n_tiles + 1) + kv_tile)
    end = tl.load(K2Q_OFFSETS + bh * (n_tiles + 1) + kv_tile + 1)
    q_tiles_ptr = K2Q_Q_TILES + bh.to(tl.int64) * k2q_width
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for c in range(start, end, STEP):
        offs_q, used = query_rows(q_tiles_ptr, c, end, second, col, BLOCK, PAIR)  # [BLOCK_M] x2
        qt = tl.load(q_base + offs_q[None, :] * stride_qs + offs_d[:, None] * stride_qd)  # [D, BLOCK_M]
        do = tl.load(do_base + offs_q[:, None] * stride_dos + offs_d[None, :] * stride_dod)  # [BLOCK_M, D]
        lse_log2 = tl.load(LSE + row_base + offs_q) * LOG2E  # [BLOCK_M]
        delta = tl.load(DELTA + row_base + offs_q)  # [BLOCK_M]
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale_log2  # [keys, queries] = [BLOCK, BLOCK_M]
        st = tl.where(real_key[:, None], st, float("-inf"))
        if PAIR:
            st = tl.where(used[None, :], st, float("-inf"))
        pt = tl.math.exp2(st - lse_log2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)

    dk *= sm_scale
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_kv[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_kv[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
