"""The whole Triton VSA op as one torch.autograd.Function, for eager mode.

Why a second entry point: in eager mode each torch.library custom op pays its Python dispatch (argument
defaults, alias checks, the dynamo-disable wrapper, an autograd node of its own) on every call, and at
16K tokens the op was host-bound on an H100 (docs/benchmarks.md). Here the same launchers (pool.py,
gating.py, block_sparse/op.py, block_sparse/index.py) run from one forward and one backward, with the
coarse attention's backward written out. torch.compile keeps using the custom ops (vsa._attend), which
it can trace; both paths launch the same kernels and give the same results.
"""
import torch

from . import warm
from .block_sparse import op as _block_sparse_op  # CENTER_KEYS, read per call
from .block_sparse.index import build_k2q_index
from .block_sparse.op import (
    block_sparse_bwd_triton,
    block_sparse_fwd_triton,
    device_guard,
    key_shift_from_tile_means,
)
from .coarse import topk_tiles
from .gating import gated_combine_bwd, gated_combine_fwd
from .pool import tile_means_bwd, tile_means_fwd

__all__ = ["vsa_triton_eager"]


class _VideoSparseAttention(torch.autograd.Function):
    """Pool -> coarse attention -> top-k -> fine stage -> gated combine; backward in reverse, in one node."""

    @staticmethod
    def forward(ctx, q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, out_len, topk):
        scale = q.shape[-1] ** -0.5
        means = tile_means_fwd(q, k, v, kv_tile_sizes)  # fp32 [3, B, H, n, D]
        q_c, k_c, v_c = means.unbind(0)  # [B, H, n, D] each
        with torch.autocast(q.device.type, enabled=False):  # fp32 under autocast too, as the backward expects
            scores = torch.matmul(q_c, k_c.transpose(-1, -2)).mul_(scale)  # [B, H, n, n]
            probs = scores.softmax(dim=-1)  # [B, H, n, n]
            o_coarse = torch.matmul(probs, v_c).transpose(1, 2)  # [B, n, H, D] fp32, channels contiguous
        q2k_index, q2k_count = topk_tiles(scores, topk)  # [B, H, n, K], [B, H, n]
        o_fine, lse = block_sparse_fwd_triton(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale)  # [B, S_pad, H, D]
        out = gated_combine_fwd(o_coarse, o_fine, gate_coarse, gate_fine, raster_tokens, out_len)  # [B, out_len, H, D]
        if any(ctx.needs_input_grad):  # the key->query index only serves the backward
            with device_guard(q):
                k2q_offsets, k2q_q_tiles = build_k2q_index(q2k_index, q2k_count, kv_tile_sizes.shape[0])
            ctx.save_for_backward(q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, means, probs,
                                  o_coarse, o_fine, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles)
            ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        (q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, means, probs,
         o_coarse, o_fine, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles) = ctx.saved_tensors
        scale = ctx.scale
        # dQ of the fine stage with keys centred by their mean (from the pooled means: no pass over K), for a
        # well-conditioned dQ when keys share a large offset (block_sparse/op.py, CENTER_KEYS).
        shift = key_shift_from_tile_means(means[1], kv_tile_sizes) if _block_sparse_op.CENTER_KEYS else None
        d_coarse, d_fine, d_gc, d_gf = gated_combine_bwd(dout, o_coarse, o_fine, gate_coarse, gate_fine,
                                                         raster_tokens)  # fp32 [B, n, H, D], [B, S_pad, H, D], ...
        dq, dk, dv = block_sparse_bwd_triton(d_fine, None, q, k, v, o_fine, lse, q2k_index, q2k_count,
                                             k2q_offsets, k2q_q_tiles, kv_tile_sizes, scale,
                                             shift)  # [B, S_pad, H, D]
        # Coarse attention backward (O_c = softmax(scale * q_c k_c^T) v_c), into one [3, B, H, n, D] buffer.
        q_c, k_c, v_c = means.unbind(0)  # [B, H, n, D] each
        d_oc = d_coarse.transpose(1, 2)  # [B, H, n, D]
        d_means = torch.empty_like(means)  # [3, B, H, n, D]
        torch.matmul(probs.transpose(-1, -2), d_oc, out=d_means[2])  # dv_c
        d_probs = torch.matmul(d_oc, v_c.transpose(-1, -2))  # [B, H, n, n]
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, torch.float32).mul_(scale)  # d(q_c k_c^T)
        torch.matmul(d_scores, k_c, out=d_means[0])  # dq_c
        torch.matmul(d_scores.transpose(-1, -2), q_c, out=d_means[1])  # dk_c
        # The pooling's gradient is added into the fine stage's dq, dk, dv by the same launch.
        tile_means_bwd(d_means, kv_tile_sizes, q.shape[1], q.dtype, accumulate=(dq, dk, dv))  # [B, S_pad, H, D] each
        d_gc = d_gc if gate_coarse is not None else None
        d_gf = d_gf if gate_fine is not None else None
        return dq, dk, dv, d_gc, d_gf, None, None, None, None


def vsa_triton_eager(q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, out_len: int, topk: int):
    """VSA with the Triton kernels on checked inputs in padded tile order; O in raster order given raster_tokens.

    q, k, v: [B, S_pad, H, D]; gates like the output ([B, out_len, H, D]) or None; kv_tile_sizes int32 [n];
    raster_tokens: int32 [S_pad] (TileLayout.raster_tokens) or None for tile order out. Not for torch.compile.
    """
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, gate_coarse, gate_fine))
    warm.wait(grad=grad)  # not while a warm-up compiles these kernels (ops/warm.py)
    return _VideoSparseAttention.apply(q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, out_len, topk)
