"""Tile means of q, k and v in one Triton kernel (the VSA coarse stage's pooling), with its backward.

`tile_means_fwd` pools all three tensors in padded tile order in one launch into float32 means: the
selection is made from them, and means rounded to bf16 flip top-k choices (docs/design.md). The means are
stored [B, H, n, D], so the coarse attention's matmuls read them without a copy. `tile_means_bwd` spreads
their gradient over the real rows (pad rows get 0), optionally added in place to given gradients.
`coarse.tile_mean` is the PyTorch reference; vsa_function.py is the only caller.
"""
import torch
import triton
import triton.language as tl

from .launch import BLOCK, device_guard, new_output

__all__ = ["tile_means_bwd", "tile_means_fwd"]


# Size arguments are not specialised on (== 1, divisible by 16): one compile serves every video size.
@triton.jit(do_not_specialize=["n_batch", "n_heads", "n_tiles"])
def tile_means_fwd_kernel(
    Q, K, V, MEANS, SIZES,  # [B, S_pad, H, D] x3 (any strides), fp32 [3, B, H, n, D] contiguous, int32 [n]
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    n_batch, n_heads, n_tiles,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program = one tile of one (batch, head): the fp32 means of its real q, k and v rows."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    size = tl.load(SIZES + tile)
    offs_m = tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    real = (tl.arange(0, BLOCK) < size)[:, None]  # pad rows may hold anything finite: never read
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=real, other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_m[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=real, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_m[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=real, other=0.0)
    # Sums in fp32, one division by the size in fp32 (no half-precision rounding anywhere).
    inv = 1.0 / size.to(tl.float32)
    out = MEANS + (bh.to(tl.int64) * n_tiles + tile) * HEAD_DIM + offs_d  # plane 0 (q) of [3, B*H, n, D]
    plane = n_batch * n_heads * n_tiles * HEAD_DIM
    tl.store(out, tl.sum(q.to(tl.float32), 0) * inv)
    tl.store(out + plane, tl.sum(k.to(tl.float32), 0) * inv)
    tl.store(out + 2 * plane, tl.sum(v.to(tl.float32), 0) * inv)


@triton.jit(do_not_specialize=["n_batch", "n_heads", "n_tiles"])
def tile_means_bwd_kernel(
    DMEANS, DQ, DK, DV, SIZES,  # fp32 [3, B, H, n, D] contiguous, [B, S_pad, H, D] x3 contiguous, int32 [n]
    n_batch, n_heads, n_tiles,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """One program = one tile of one (batch, head): each real row gets dmean / size, each pad row 0.

    ACCUMULATE adds that to what DQ, DK, DV hold (in fp32, one rounding) instead of overwriting it.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    size = tl.load(SIZES + tile)
    offs_m = tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    real = (tl.arange(0, BLOCK) < size)[:, None]  # [BLOCK, 1]
    inv = 1.0 / size.to(tl.float32)
    src = DMEANS + (bh.to(tl.int64) * n_tiles + tile) * HEAD_DIM + offs_d
    plane = n_batch * n_heads * n_tiles * HEAD_DIM
    # Every row of the tile is written (pad rows with 0), so the outputs need no zero fill.
    rows = ((b * n_tiles * BLOCK + offs_m[:, None]) * n_heads + h) * HEAD_DIM + offs_d[None, :]  # [BLOCK, D]
    zero = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dq = tl.where(real, zero + (tl.load(src) * inv)[None, :], 0.0)
    dk = tl.where(real, zero + (tl.load(src + plane) * inv)[None, :], 0.0)
    dv = tl.where(real, zero + (tl.load(src + 2 * plane) * inv)[None, :], 0.0)
    if ACCUMULATE:
        dq += tl.load(DQ + rows).to(tl.float32)
        dk += tl.load(DK + rows).to(tl.float32)
        dv += tl.load(DV + rows).to(tl.float32)
    tl.store(DQ + rows, dq.to(DQ.dtype.element_ty))
    tl.store(DK + rows, dk.to(DK.dtype.element_ty))
    tl.store(DV + rows, dv.to(DV.dtype.element_ty))


def tile_means_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_tile_sizes: torch.Tensor,
                   poison: bool = False) -> torch.Tensor:
    """Launch the forward kernel: fp32 [3, B, H, n, D], the means of q, k, v over the real rows of each tile.

    q, k, v: [B, S_pad, H, D] in padded tile order (any strides; pad rows may hold anything, they are not read).
    poison: NaN-filled output (KernelOptions.poison_outputs).
    """
    B, S_pad, H, D = q.shape
    n = S_pad // BLOCK
    means = new_output((3, B, H, n, D), torch.float32, q.device, poison)
    with device_guard(q):
        tile_means_fwd_kernel[(n, B * H)](
            q, k, v, means, kv_tile_sizes.contiguous(),
            *q.stride(), *k.stride(), *v.stride(), B, H, n,
            HEAD_DIM=D, BLOCK=BLOCK, num_warps=4,
        )
    return means


def tile_means_bwd(dmeans: torch.Tensor, kv_tile_sizes: torch.Tensor, seq_len: int, dtype: torch.dtype,
                   accumulate=None, poison: bool = False):
    """Launch the backward kernel: (dq, dk, dv) [B, seq_len, H, D] in `dtype` from dmeans [3, B, H, n, D].

    accumulate: None, or three contiguous tensors of that shape and dtype that the gradients are added to in
    place (and returned): the VSA backward adds them to the fine stage's dq, dk, dv without three more launches.
    """
    _, B, H, n, D = dmeans.shape
    if accumulate is None:
        grads = [new_output((B, seq_len, H, D), dtype, dmeans.device, poison) for _ in range(3)]
    else:
        grads = list(accumulate)
        if any(not g.is_contiguous() or g.shape != (B, seq_len, H, D) or g.dtype != dtype for g in grads):
            raise ValueError(f"tile_means_bwd: accumulate must be 3 contiguous {dtype} tensors {(B, seq_len, H, D)}")
    with device_guard(dmeans):
        tile_means_bwd_kernel[(n, B * H)](
            dmeans.float().contiguous(), *grads, kv_tile_sizes.contiguous(), B, H, n,
            HEAD_DIM=D, BLOCK=BLOCK, ACCUMULATE=accumulate is not None, num_warps=4,
        )
    return tuple(grads)
