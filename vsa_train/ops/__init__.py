"""Video Sparse Attention ops: the public op, the block-sparse fine stage, tiling helpers and references.

    video_sparse_attention(q, k, v, video_shape, topk, ...)     tokens in raster order
    video_sparse_attention_tiled(q, k, v, layout, topk, ...)    tokens already in padded tile order
    block_sparse_attention(q, k, v, q2k_index, q2k_count, kv_tile_sizes, ...)   the fine stage alone
    TileLayout(video_shape, tile)                               raster <-> padded tile order, tile sizes
    block_sparse_attention_torch, naive_*                       PyTorch reference and float64 ground truth

Modules: vsa.py (public op, checks), eager.py (the Triton op as one autograd.Function in eager mode; the
custom ops of pool.py, gating.py, block_sparse/ serve torch.compile), tiling.py (layout tables), coarse.py (pooling, coarse attention, top-k in
PyTorch), pool.py (Triton tile means), gating.py (Triton combine O_c*G_c + O_f*G_f, raster or tile order),
block_sparse/ (the fine stage: Triton forward/backward kernels, k2q index kernels, custom ops), reference.py and
naive.py (PyTorch reference and float64 ground truth).

This package imports nothing else of vsa_train: it is usable on its own as a kernel library.
"""
from .block_sparse import block_sparse_attention
from .coarse import (
    coarse_attention,
    local_tile_mask,
    q2k_from_mask,
    tile_mean,
    topk_tiles,
)
from .naive import (
    naive_attention,
    naive_block_sparse_attention,
    naive_video_sparse_attention,
)
from .reference import block_sparse_attention_torch
from .tiling import TileLayout
from .vsa import combine, video_sparse_attention, video_sparse_attention_tiled

__all__ = [
    "TileLayout",
    "block_sparse_attention",
    "block_sparse_attention_torch",
    "coarse_attention",
    "combine",
    "local_tile_mask",
    "naive_attention",
    "naive_block_sparse_attention",
    "naive_video_sparse_attention",
    "q2k_from_mask",
    "tile_mean",
    "topk_tiles",
    "video_sparse_attention",
    "video_sparse_attention_tiled",
]
