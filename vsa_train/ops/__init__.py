"""Video Sparse Attention ops: the public op, the block-sparse fine stage, tiling helpers and references.

    video_sparse_attention(q, k, v, video_shape, topk, ...)     tokens in raster order
    video_sparse_attention_tiled(q, k, v, layout, topk, ...)    tokens already in padded tile order
    block_sparse_attention(q, k, v, q2k_index, q2k_count, kv_tile_sizes, ...)   the fine stage alone
    TileLayout(video_shape, tile)                               raster <-> padded tile order, tile sizes
    KernelOptions(center_keys, tile_pairs, poison_outputs)      how the Triton kernels run (keyword `options=`)
    block_sparse_attention_torch, naive_*                       PyTorch reference and float64 ground truth

Each Triton op is layered kernels -> launcher -> autograd Function -> documented public function, and eager
mode and torch.compile run the same Function (its bodies registered as custom ops for the compiler):

    vsa.py            public op and its checks; the PyTorch backend (coarse.py + reference.py)
    vsa_function.py   the Triton op's autograd Function: pool -> coarse -> top-k -> fine -> combine, and back
    pool.py, gating.py              Triton tile means and gated combine (kernels + launchers)
    block_sparse/     the fine stage: kernels (fwd.py, bwd.py, index.py), configs.py, launch.py, function.py,
                      and the public function (__init__.py)
    launch.py         what every launcher shares: the 64-row tile, KernelOptions, output allocation
    tiling.py         TileLayout: raster <-> padded tile order tables
    coarse.py         pooling, coarse attention, top-k selection in PyTorch
    reference.py, naive.py          PyTorch reference and float64 ground truth
    warm.py           the background kernel compile and the waits for it

This package imports nothing else of vsa_train: it is usable on its own as a kernel library. triton is optional:
without it the kernel modules are not imported and backend="torch" (what "auto" picks on CPU) runs.
"""
from .block_sparse import block_sparse_attention
from .launch import KernelOptions
from .coarse import (
    coarse_attention,
    local_tile_mask,
    observe_selections,
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
    "KernelOptions",
    "TileLayout",
    "block_sparse_attention",
    "block_sparse_attention_torch",
    "coarse_attention",
    "combine",
    "local_tile_mask",
    "naive_attention",
    "naive_block_sparse_attention",
    "naive_video_sparse_attention",
    "observe_selections",
    "q2k_from_mask",
    "tile_mean",
    "topk_tiles",
    "video_sparse_attention",
    "video_sparse_attention_tiled",
]
