"""Block-sparse attention (the VSA fine stage) in plain PyTorch: the CPU backend and the kernels' reference.

Each query tile gathers its selected key/value tiles (whole padded blocks) and runs a masked softmax
over them, so memory grows with the selection (B * H * S_pad * K * block scores), not with S_pad^2.
Differentiable by ordinary autograd; softmax in float32 for half inputs (float64 stays float64).
"""
import math

import torch

from .coarse import compute_dtype

__all__ = ["block_sparse_attention_torch"]


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q2k_index: torch.Tensor,
    q2k_count: torch.Tensor,
    kv_tile_sizes: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-stage attention of each query tile over its selected key tiles, in padded tile order.

    q, k, v: [B, S_pad, H, D]; q2k_index int32 [B, H, n_q, K], its first q2k_count[b, h, i] entries being
    the key tiles of query tile i; kv_tile_sizes int32 [n_kv] real rows per key tile (pad rows are never
    attended to). The tile block is S_pad // n_kv rows (64 for the default (4, 4, 4) tile).
    Returns out [B, S_pad, H, D] in q's dtype and lse float32 [B, H, S_pad] (natural log; differentiable too, like the Triton backend).
    """
    B, S_q, H, D = q.shape
    n_kv = kv_tile_sizes.numel()
    block = k.shape[1] // n_kv
    n_q, K = q2k_index.shape[2], q2k_index.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = compute_dtype(q.dtype)

    # Tiles as [B, H, n, block, D], in the softmax dtype.
    qt = q.to(cdt).view(B, n_q, block, H, D).permute(0, 3, 1, 2, 4)  # [B, H, n_q, block, D]
    kt = k.to(cdt).view(B, n_kv, block, H, D).permute(0, 3, 1, 2, 4)  # [B, H, n_kv, block, D]
    vt = v.to(cdt).view(B, n_kv, block, H, D).permute(0, 3, 1, 2, 4)  # [B, H, n_kv, block, D]

    # Entries past the count may hold anything: point them at tile 0 and mask them out below.
    slot = torch.arange(K, device=q.device)  # [K]
    used = slot < q2k_count[..., None]  # [B, H, n_q, K]
    index = torch.where(used, q2k_index, 0).long()  # [B, H, n_q, K]
    b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    h = torch.arange(H, device=q.device).view(1, H, 1, 1)
    k_sel = kt[b, h, index]  # [B, H, n_q, K, block, D]
    v_sel = vt[b, h, index]  # [B, H, n_q, K, block, D]

    # A key row is attended iff its slot is used and it is a real token of its tile.
    real = torch.arange(block, device=q.device) < kv_tile_sizes[index][..., None]  # [B, H, n_q, K, block]
    keep = (used[..., None] & real).flatten(-2)[..., None, :]  # [B, H, n_q, 1, K*block]

    scores = torch.einsum("bhiqd,bhijkd->bhiqjk", qt, k_sel).flatten(-2) * scale  # [B, H, n_q, block, K*block]
    scores = scores.masked_fill(~keep, float("-inf"))  # [B, H, n_q, block, K*block]
    lse = scores.logsumexp(dim=-1)  # [B, H, n_q, block]
    probs = torch.exp(scores - lse[..., None])  # [B, H, n_q, block, K*block]
    out = torch.einsum("bhiqj,bhijd->bhiqd", probs, v_sel.flatten(3, 4))  # [B, H, n_q, block, D]

    out = out.permute(0, 2, 3, 1, 4).reshape(B, S_q, H, D).to(q.dtype)  # [B, S_pad, H, D]
    return out, lse.reshape(B, H, S_q).float()
