"""Triton forward kernel of block-sparse attention over 64-row tiles (online softmax, LSE saved).

PAIR (KernelOptions.tile_pairs): each loop iteration takes two of the query tile's key tiles at once, one online-softmax
update over 128 key columns (64 x 128 products for the tensor cores, half the iterations); else one tile.
"""
import triton
import triton.language as tl

from .configs import fwd_configs

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def key_rows(index_ptr, c, count, KV_TILE_SIZES, BLOCK: tl.constexpr, PAIR: tl.constexpr):
    """The key rows of loop iteration c over a query tile's selected key tiles, which are real, and whether all
    are: ([BLOCK_N] row offsets, [BLOCK_N] mask, scalar), BLOCK_N = BLOCK (index entry c) or 2 * BLOCK with PAIR
    (entries c and c + 1, gathered). Shared by the forward and the dQ kernel, so both walk the selection the same way."""
    kv_tile = tl.load(index_ptr + c)
    size = tl.load(KV_TILE_SIZES + kv_tile)
    if PAIR:
        # An odd count's last pair has an empty second slot: it reloads the first tile (in bounds, any
        # finite values) and counts 0 real rows, so its columns get logits -inf and probability 0.
        offs_n = tl.arange(0, 2 * BLOCK)
        second = offs_n >= BLOCK                        # [BLOCK_N]: row of the pair's second tile
        col = tl.where(second, offs_n - BLOCK, offs_n)  # [BLOCK_N]: row within its key tile
        kv_tile2 = tl.load(index_ptr + tl.minimum(c + 1, count - 1))
        size2 = tl.where(c + 1 < count, tl.load(KV_TILE_SIZES + kv_tile2), 0)
        offs_kv = tl.where(second, kv_tile2, kv_tile) * BLOCK + col  # [BLOCK_N] gathered key rows
        real = col < tl.where(second, size2, size)                  # [BLOCK_N]
        full = (size == BLOCK) & (size2 == BLOCK)
    else:
        offs_n = tl.arange(0, BLOCK)
        offs_kv = kv_tile * BLOCK + offs_n  # [BLOCK_N]
        real = offs_n < size                # [BLOCK_N]
        full = size == BLOCK
    return offs_kv, real, full


# Size arguments are not specialised on (== 1, divisible by 16): one compile serves every video size.
@triton.autotune(configs=fwd_configs(), key=["HEAD_DIM", "DOT_PRECISION", "PAIR"])
@triton.jit(do_not_specialize=["n_heads", "n_tiles", "max_k"])
def block_sparse_fwd_kernel(
    Q, K, V, O, LSE,                      # [B, S, H, D] x4 (any strides), LSE [B, H, S] fp32 contiguous
    Q2K_INDEX, Q2K_COUNT, KV_TILE_SIZES,  # int32 [B*H, n_tiles, max_k], [B*H, n_tiles], [n_tiles]
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    n_heads, n_tiles, max_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, PAIR: tl.constexpr,
):
    """One program = one query tile of one (batch, head); loops over the tile's selected key tiles (PAIR: two
    per iteration, entries c and c + 1 of its index, gathered into one block of 2 * BLOCK key rows)."""
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    h = bh % n_heads
    qk_scale_log2 = sm_scale * LOG2E  # exp(x) = exp2(x * log2 e): the scale and log2 e fold into one multiply

    # Annotated: the loop step must stay a constexpr (the interpreter makes a plain assignment a tensor).
    STEP: tl.constexpr = 2 if PAIR else 1  # key tiles per iteration
    offs_m = q_tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs)  # [BLOCK, D]
    # K is loaded transposed ([D, BLOCK_N]) so that q @ k needs no in-register transpose.
    k_base = K + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

    row = bh * n_tiles + q_tile
    count = tl.load(Q2K_COUNT + row)
    index_ptr = Q2K_INDEX + row.to(tl.int64) * max_k

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)  # running max of scaled logits (log2 units)
    l_i = tl.zeros([BLOCK], tl.float32)                 # running softmax denominator
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for c in range(0, count, STEP):
        offs_kv, real, full = key_rows(index_ptr, c, count, KV_TILE_SIZES, BLOCK, PAIR)  # [BLOCK_N] x2, scalar
        k = tl.load(k_base + offs_kv[None, :] * stride_ks)  # [D, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION)     # [BLOCK, BLOCK_N] unscaled logits
        # Pad rows of a key tile are never attended: their logits are -inf before the max. Only edge tiles
        # have pad rows, so the select runs only there (a select on every tile slows the whole loop).
        if not full:
            s = tl.where(real[None, :], s, float("-inf"))
        # m_new is finite: each iteration's first tile has >= 1 real row (no -inf - -inf in p). The scale is
        # positive, so the max of the scaled logits is the scaled max; scaling inside exp2 is one FMA.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
        p = tl.math.exp2(s * qk_scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf), as no row is empty
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_kv[:, None] * stride_vs)  # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty))
    # LSE in natural-log units of the scaled logits: lse = ln(sum_j exp(scale * q.k_j)).
    tl.store(LSE + bh.to(tl.int64) * n_tiles * BLOCK + offs_m, (m_i + tl.math.log2(l_i)) * LN2)
