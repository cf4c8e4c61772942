"""Naive mask-based VSA: the ground truth for tests (dense [B, H, S, S] masks; small shapes only).

Everything is computed in the dtype it is given (tests pass float64) and written as directly as the
algorithm reads (docs/design.md, 'VSA: the algorithm'), independently of the tiling tables and gathers of the real
code.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["naive_attention", "naive_block_sparse_attention", "naive_video_sparse_attention"]


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with a boolean mask [B, H, S_q, S_k] (True = attend): returns (out [B, S_q, H, D], lse [B, H, S_q])."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, S_q, S_k]
    scores = scores.masked_fill(~mask, float("-inf"))  # [B, H, S_q, S_k]
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)  # [B, S_q, H, D]
    return out, scores.logsumexp(dim=-1)


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q2k_index: torch.Tensor,
    q2k_count: torch.Tensor,
    kv_tile_sizes: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine stage alone, same arguments and layout as `block_sparse_attention`, via a dense mask."""
    B, H, n_q, K = q2k_index.shape
    n_kv = kv_tile_sizes.numel()
    block = k.shape[1] // n_kv
    selected = torch.zeros(B, H, n_q, n_kv, dtype=torch.bool, device=q.device)
    for slot in range(K):  # mark each used slot's key tile
        used = slot < q2k_count  # [B, H, n_q]
        selected |= F.one_hot(q2k_index[..., slot].long().clamp(0, n_kv - 1), n_kv).bool() & used[..., None]
    real = (torch.arange(block, device=q.device) < kv_tile_sizes[:, None]).flatten()  # [n_kv * block]
    mask = selected.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3) & real  # [B, H, S_q, S_k]
    return naive_attention(q, k, v, mask, scale)


def naive_video_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    video_shape,
    topk: int,
    gate_coarse: torch.Tensor | None = None,
    gate_fine: torch.Tensor | None = None,
    tile=(4, 4, 4),
) -> torch.Tensor:
    """The whole VSA op on [B, S, H, D] tensors in raster order of video_shape.

    See docs/design.md, 'VSA: the algorithm'.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])

    # Tile of every raster token, tiles numbered in raster order over the tile grid.
    coords = torch.meshgrid(*(torch.arange(n, device=q.device) for n in video_shape), indexing="ij")
    grid = [-(-n // t) for n, t in zip(video_shape, tile)]
    tile_t, tile_h, tile_w = (c.flatten() // t for c, t in zip(coords, tile))
    tile_id = (tile_t * grid[1] + tile_h) * grid[2] + tile_w  # [S]
    member = F.one_hot(tile_id, math.prod(grid)).to(q.dtype)  # [S, n]

    # Coarse stage: mean over each tile's tokens, tile attention, broadcast back to the tile's tokens.
    def pool(x):
        return torch.einsum("sn,bshd->bnhd", member, x) / member.sum(0)[:, None, None]  # [B, n, H, D]

    scores = torch.einsum("bihd,bjhd->bhij", pool(q), pool(k)) * scale  # [B, H, n, n]
    o_coarse = torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), pool(v))[:, tile_id]  # [B, S, H, D]

    # Selection: top-k key tiles per query tile, expanded to a token mask.
    top = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices  # [B, H, n, K]
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)  # [B, H, n, n]
    mask = selected[:, :, tile_id][:, :, :, tile_id]  # [B, H, S, S]
    o_fine, _ = naive_attention(q, k, v, mask, scale)  # [B, S, H, D]

    gate_coarse = 1.0 if gate_coarse is None else gate_coarse
    gate_fine = 1.0 if gate_fine is None else gate_fine
    return o_coarse * gate_coarse + o_fine * gate_fine
