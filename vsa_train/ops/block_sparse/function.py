"""The fine stage as one autograd Function, for eager mode and torch.compile alike.

Its forward and backward bodies are plain functions over the launchers (launch.py); each is also registered
as a torch custom op (with a fake for shapes), which is what the Function calls while torch.compile traces it
(launch.eager_or_registered): the compiler sees two opaque ops with fixed shapes and no host synchronisation.
"""
import torch

from .. import warm
from ..launch import eager_or_registered
from .index import k2q_index_if
from .launch import block_sparse_bwd_triton, block_sparse_fwd_triton

__all__ = ["BlockSparseAttentionFunction"]


def block_sparse_forward(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale: float, build_k2q: bool, pair: bool,
                         poison: bool):
    """(out, lse, k2q_offsets, k2q_q_tiles); the key->query index only when a backward will follow."""
    warm.wait(grad=build_k2q)  # not while a warm-up compiles these kernels (ops/warm.py)
    out, lse = block_sparse_fwd_triton(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale, pair, poison)
    return out, lse, *k2q_index_if(build_k2q, q2k_index, q2k_count, kv_tile_sizes.shape[0])


@torch.library.custom_op("vsa_train::block_sparse_fwd", mutates_args=())
def block_sparse_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q2k_index: torch.Tensor, q2k_count: torch.Tensor, kv_tile_sizes: torch.Tensor,
    scale: float, build_k2q: bool, pair: bool, poison: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_sparse_forward, opaque to torch.compile."""
    return block_sparse_forward(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale, build_k2q, pair, poison)


@block_sparse_fwd_op.register_fake
def _block_sparse_fwd_fake(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale, build_k2q, pair, poison):
    B, S, H, _ = q.shape
    _, _, n_q_tiles, max_k = q2k_index.shape
    if build_k2q:
        k2q = (q2k_index.new_empty(B, H, kv_tile_sizes.shape[0] + 1), q2k_index.new_empty(B, H, n_q_tiles * max_k))
    else:
        k2q = (q2k_index.new_empty(0), q2k_index.new_empty(0))
    return q.new_empty(q.shape), q.new_empty(B, H, S, dtype=torch.float32), *k2q


@torch.library.custom_op("vsa_train::block_sparse_bwd", mutates_args=())
def block_sparse_bwd_op(
    do: torch.Tensor, dlse: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    q2k_index: torch.Tensor, q2k_count: torch.Tensor, k2q_offsets: torch.Tensor, k2q_q_tiles: torch.Tensor,
    kv_tile_sizes: torch.Tensor, scale: float, shift: torch.Tensor | None, pair: bool, poison: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_sparse_bwd_triton, opaque to torch.compile: (dq, dk, dv)."""
    return block_sparse_bwd_triton(do, dlse, q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles,
                                   kv_tile_sizes, scale, shift, pair, poison)


@block_sparse_bwd_op.register_fake
def _block_sparse_bwd_fake(do, dlse, q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles,
                           kv_tile_sizes, scale, shift, pair, poison):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class BlockSparseAttentionFunction(torch.autograd.Function):
    """(out, lse) of the fine stage; backward through both (dLSE arrives as zeros when lse is unused)."""

    @staticmethod
    def forward(ctx, q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale, key_shift, build_k2q, options):
        pair = options.pairs(q.shape[-1])
        forward = eager_or_registered(block_sparse_forward, block_sparse_fwd_op)
        out, lse, k2q_offsets, k2q_q_tiles = forward(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale, build_k2q,
                                                     pair, options.poison_outputs)
        ctx.save_for_backward(q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles, kv_tile_sizes,
                              key_shift)
        ctx.scale, ctx.pair, ctx.poison = scale, pair, options.poison_outputs
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles, kv_tile_sizes, shift = ctx.saved_tensors
        if k2q_offsets.numel() == 0:
            raise RuntimeError("block_sparse_attention ran without a key->query index, so it cannot be differentiated")
        backward = eager_or_registered(block_sparse_bwd_triton, block_sparse_bwd_op)
        dq, dk, dv = backward(dout, dlse, q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles,
                              kv_tile_sizes, ctx.scale, shift, ctx.pair, ctx.poison)
        return dq, dk, dv, None, None, None, None, None, None, None
