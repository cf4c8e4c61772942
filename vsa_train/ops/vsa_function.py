"""The Triton VSA op as one autograd Function, for eager mode and torch.compile alike.

Forward: pool -> coarse attention -> top-k -> fine stage (+ key->query index) -> gated combine; the backward
runs them in reverse, with the coarse attention's backward written out and the pooling's gradient added into
the fine stage's dq, dk, dv by one launch. Both bodies are plain functions over the launchers (pool.py,
gating.py, block_sparse/launch.py), each also registered as a torch custom op (with a fake for shapes): the
Function calls those while torch.compile traces it (launch.eager_or_registered), so compiled and eager
training run the same code; eager mode alone skips the custom ops' per-call dispatch.
"""
import torch

from . import warm
from .block_sparse.index import k2q_index_if
from .block_sparse.launch import block_sparse_bwd_triton, block_sparse_fwd_triton, key_shift_from_tile_means
from .coarse import topk_tiles
from .gating import gated_combine_bwd, gated_combine_fwd
from .launch import eager_or_registered
from .pool import tile_means_bwd, tile_means_fwd

__all__ = ["VideoSparseAttentionFunction"]

_Tensor = torch.Tensor
_Optional = torch.Tensor | None


def vsa_forward(q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, out_len: int, topk: int,
                need_grad: bool, pair: bool, poison: bool):
    """(out [B, out_len, H, D], then what the backward needs: means, probs, o_coarse, o_fine, lse, q2k_index,
    q2k_count, k2q_offsets, k2q_q_tiles; the last two empty without need_grad)."""
    warm.wait(grad=need_grad)  # not while a warm-up compiles these kernels (ops/warm.py)
    scale = q.shape[-1] ** -0.5
    means = tile_means_fwd(q, k, v, kv_tile_sizes, poison)  # fp32 [3, B, H, n, D]
    q_c, k_c, v_c = means.unbind(0)  # [B, H, n, D] each
    with torch.autocast(q.device.type, enabled=False):  # fp32 under autocast too, as the backward expects
        scores = torch.matmul(q_c, k_c.transpose(-1, -2)).mul_(scale)  # [B, H, n, n]
        probs = scores.softmax(dim=-1)  # [B, H, n, n]
        o_coarse = torch.matmul(probs, v_c)  # [B, H, n, D] fp32
    q2k_index, q2k_count = topk_tiles(scores, topk)  # [B, H, n, K], [B, H, n]
    o_fine, lse = block_sparse_fwd_triton(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale, pair, poison)
    out = gated_combine_fwd(o_coarse.transpose(1, 2), o_fine, gate_coarse, gate_fine, raster_tokens, out_len, poison)
    k2q_offsets, k2q_q_tiles = k2q_index_if(need_grad, q2k_index, q2k_count, kv_tile_sizes.shape[0])
    return out, means, probs, o_coarse, o_fine, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles


def vsa_backward(dout, q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, means, probs, o_coarse, o_fine,
                 lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles, center_keys: bool, pair: bool, poison: bool):
    """(dq, dk, dv [B, S_pad, H, D], d_gate_coarse, d_gate_fine; an absent gate's gradient is empty)."""
    scale = q.shape[-1] ** -0.5
    # dQ of the fine stage with keys centred by their mean, taken from the pooled means (no pass over K).
    shift = key_shift_from_tile_means(means[1], kv_tile_sizes) if center_keys else None
    d_coarse, d_fine, d_gc, d_gf = gated_combine_bwd(dout, o_coarse.transpose(1, 2), o_fine, gate_coarse, gate_fine,
                                                     raster_tokens, poison)  # fp32 [B, n, H, D], [B, S_pad, H, D]
    dq, dk, dv = block_sparse_bwd_triton(d_fine, None, q, k, v, o_fine, lse, q2k_index, q2k_count, k2q_offsets,
                                         k2q_q_tiles, kv_tile_sizes, scale, shift, pair, poison)  # [B, S_pad, H, D]
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
    return dq, dk, dv, d_gc, d_gf


@torch.library.custom_op("vsa_train::vsa_fwd", mutates_args=())
def vsa_fwd_op(q: _Tensor, k: _Tensor, v: _Tensor, gate_coarse: _Optional, gate_fine: _Optional,
               kv_tile_sizes: _Tensor, raster_tokens: _Optional, out_len: int, topk: int, need_grad: bool, pair: bool,
               poison: bool) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor,
                                      _Tensor]:
    """vsa_forward, opaque to torch.compile."""
    return vsa_forward(q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, out_len, topk, need_grad, pair,
                       poison)


@vsa_fwd_op.register_fake
def _vsa_fwd_fake(q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, out_len, topk, need_grad, pair,
                  poison):
    B, S_pad, H, D = q.shape
    n = kv_tile_sizes.shape[0]
    K = min(topk, n)
    index = q.new_empty(B, H, n, K, dtype=torch.int32)
    k2q = (index.new_empty(B, H, n + 1), index.new_empty(B, H, n * K)) if need_grad else (index.new_empty(0),
                                                                                         index.new_empty(0))
    f32 = {"dtype": torch.float32}
    return (q.new_empty(B, out_len, H, D), q.new_empty(3, B, H, n, D, **f32), q.new_empty(B, H, n, n, **f32),
            q.new_empty(B, H, n, D, **f32), q.new_empty(q.shape), q.new_empty(B, H, S_pad, **f32), index,
            index.new_empty(B, H, n), *k2q)


@torch.library.custom_op("vsa_train::vsa_bwd", mutates_args=())
def vsa_bwd_op(dout: _Tensor, q: _Tensor, k: _Tensor, v: _Tensor, gate_coarse: _Optional, gate_fine: _Optional,
               kv_tile_sizes: _Tensor, raster_tokens: _Optional, means: _Tensor, probs: _Tensor, o_coarse: _Tensor,
               o_fine: _Tensor, lse: _Tensor, q2k_index: _Tensor, q2k_count: _Tensor, k2q_offsets: _Tensor,
               k2q_q_tiles: _Tensor, center_keys: bool, pair: bool, poison: bool,
               ) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor]:
    """vsa_backward, opaque to torch.compile."""
    return vsa_backward(dout, q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, means, probs, o_coarse,
                        o_fine, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles, center_keys, pair, poison)


@vsa_bwd_op.register_fake
def _vsa_bwd_fake(dout, q, k, v, gate_coarse, gate_fine, *_):
    d_gates = (dout.new_empty(dout.shape) if g is not None else dout.new_empty(0) for g in (gate_coarse, gate_fine))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *d_gates


class VideoSparseAttentionFunction(torch.autograd.Function):
    """VSA with the Triton kernels on checked inputs in padded tile order ([B, S_pad, H, D] each; gates like the
    output). O is [B, out_len, H, D]: raster order given raster_tokens (int32 [S_pad], TileLayout.raster_tokens),
    else padded tile order. need_grad: whether a backward can follow; options: KernelOptions."""

    @staticmethod
    def forward(ctx, q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, out_len, topk, need_grad, options):
        pair, poison = options.pairs(q.shape[-1]), options.poison_outputs
        forward = eager_or_registered(vsa_forward, vsa_fwd_op)
        out, *saved = forward(q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, out_len, topk,
                              need_grad, pair, poison)
        if need_grad:
            ctx.save_for_backward(q, k, v, gate_coarse, gate_fine, kv_tile_sizes, raster_tokens, *saved)
            ctx.flags = (options.center_keys, pair, poison)
        return out

    @staticmethod
    def backward(ctx, dout):
        backward = eager_or_registered(vsa_backward, vsa_bwd_op)
        dq, dk, dv, d_gc, d_gf = backward(dout, *ctx.saved_tensors, *ctx.flags)
        gate_coarse, gate_fine = ctx.saved_tensors[3:5]
        return (dq, dk, dv, d_gc if gate_coarse is not None else None, d_gf if gate_fine is not None else None,
                None, None, None, None, None, None)
