"""VSA coarse stage in PyTorch: tile mean pooling, tile scores, coarse attention, and tile selection.

All functions work on tensors in padded tile order (see tiling.py) and are batched over batch, heads
and tiles: a handful of kernels per call, no Python loop over tiles. The coarse tensors are computed
in float32 for half-precision inputs (float64 stays float64); they are tiles x tiles, so this is cheap.
Selections are returned as the (q2k_index, q2k_count) pair that `block_sparse_attention` takes.
"""
import contextlib

import torch

from .tiling import TileLayout

__all__ = ["coarse_attention", "local_tile_mask", "observe_selections", "q2k_from_mask", "tile_mean", "topk_tiles"]

# Callbacks that see every top-k selection (observe_selections); empty, the only cost is one truthiness test.
_OBSERVERS: list = []


@contextlib.contextmanager
def observe_selections(callback):
    """Within: callback(q2k_index int32 [..., n_q, K], n_kv) is called with every selection `topk_tiles` makes (the
    VSA op's on either backend, the sparse variants'), e.g. to measure how unevenly key tiles are chosen
    (`python -m vsa_train.bench skew`). The callback must not modify the index; it runs where the selection is
    made (inside the Triton op's registered forward under torch.compile)."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics are computed in: float32 for half inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def tile_mean(x: torch.Tensor, kv_tile_sizes: torch.Tensor) -> torch.Tensor:
    """Mean of x over the real tokens of each tile: [B, S_pad, H, D] -> [B, n_tiles, H, D].

    Pad rows are excluded by position (the first kv_tile_sizes[i] rows of tile i are real), so they may
    hold anything finite. The result is in compute_dtype(x.dtype). The reference of `pool.tile_means`.
    """
    B, S_pad, H, D = x.shape
    n = kv_tile_sizes.numel()
    block = S_pad // n
    real = torch.arange(block, device=x.device) < kv_tile_sizes[:, None]  # [n, block]
    # A 0/1 matmul sums exactly the real rows, in the compute dtype: a half-precision sum would be rounded to
    # half before the division, which flips top-k selections (docs/design.md, "Selection precision"). Divide
    # afterwards so that 1/size is not rounded either.
    cdt = compute_dtype(x.dtype)
    sums = torch.matmul(real.to(cdt)[:, None, :], x.reshape(B, n, block, H * D).to(cdt))  # [B, n, 1, H*D]
    sizes = kv_tile_sizes.to(cdt).view(1, n, 1, 1)  # [1, n, 1, 1]
    return sums.view(B, n, H, D) / sizes  # [B, n, H, D]


def coarse_attention(
    q_c: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention between pooled tiles: returns (O_c [B, n, H, D], scores A = scale * q_c k_c^T [B, H, n, n])."""
    # Heads-first views: batched matmuls, with no copy when the means are stored [B, H, n, D] (pool.py).
    q_h, k_h, v_h = (x.transpose(1, 2) for x in (q_c, k_c, v_c))  # [B, H, n, D] each
    # In the means' dtype (fp32 from the Triton pooling), not autocast's bf16: bf16 scores flip top-k selections
    # (docs/design.md, "Selection precision"), and the Triton op's backward (vsa_function.py) expects fp32 probs.
    with torch.autocast(q_c.device.type, enabled=False):
        scores = torch.matmul(q_h, k_h.transpose(-1, -2)).mul_(scale)  # [B, H, n, n]
        o_c = torch.matmul(scores.softmax(dim=-1), v_h)  # [B, H, n, D]
    return o_c.transpose(1, 2), scores  # [B, n, H, D], [B, H, n, n]


def topk_tiles(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `topk` highest-scoring key tiles of each query tile (all tiles if topk >= n_kv_tiles).

    scores: [..., n_q, n_kv]. Returns q2k_index int32 [..., n_q, K] (K = min(topk, n_kv); order not
    significant) and q2k_count int32 [..., n_q] (all K). Not differentiable.
    """
    k = min(int(topk), scores.shape[-1])
    index = scores.detach().topk(k, dim=-1, sorted=False).indices.to(torch.int32)  # [..., n_q, K]
    count = torch.full(scores.shape[:-1], k, dtype=torch.int32, device=scores.device)  # [..., n_q]
    if _OBSERVERS:
        for callback in _OBSERVERS:
            callback(index, scores.shape[-1])
    return index, count


def q2k_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection from a boolean tile mask [..., n_q, n_kv] (True = attend) -> (q2k_index, q2k_count).

    K is the largest number of selected key tiles of any query tile (this reads it on the host, so
    build fixed masks once, not per step). Every query tile must select at least one key tile.
    Broadcast a mask without batch/head dims with `.expand(B, H, -1, -1)` before or after.
    """
    if mask.dtype != torch.bool or mask.dim() < 2:
        raise ValueError(f"mask must be a bool tensor [..., n_q, n_kv], got {mask.dtype} {tuple(mask.shape)}")
    count = mask.sum(dim=-1, dtype=torch.int32)  # [..., n_q]
    if bool((count == 0).any()):
        raise ValueError("mask selects no key tile for some query tile; each needs at least one")
    k = int(count.max())
    # A stable descending sort puts the selected tiles first, in ascending tile order.
    order = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices  # [..., n_q, n_kv]
    return order[..., :k].to(torch.int32).contiguous(), count


def local_tile_mask(layout: TileLayout, radius=(1, 1, 1), device=None) -> torch.Tensor:
    """Bool [n_tiles, n_tiles]: key tiles within `radius` tiles of each query tile along t, h, w."""
    grid = [torch.arange(g, device=device) for g in layout.grid]
    coords = torch.stack(torch.meshgrid(*grid, indexing="ij"), dim=-1).reshape(-1, 3)  # [n, 3]
    dist = (coords[:, None, :] - coords[None, :, :]).abs()  # [n, n, 3]
    return (dist <= torch.tensor(radius, device=device)).all(dim=-1)  # [n, n]
