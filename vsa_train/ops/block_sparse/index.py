"""The key->query index (CSR) that lets dK/dV be computed per key tile without atomics."""
import torch


def build_k2q_index(q2k_index: torch.Tensor, q2k_count: torch.Tensor, n_kv_tiles: int):
    """Invert q2k (query tile -> its key tiles) into k2q (key tile -> the query tiles that chose it).

    Returns (k2q_offsets int32 [B, H, n_kv_tiles + 1], k2q_q_tiles int32 [B, H, n_q_tiles * K]): the query
    tiles of key tile j are k2q_q_tiles[b, h, k2q_offsets[b, h, j]:k2q_offsets[b, h, j + 1]], ascending.
    The layout is compressed (CSR), so its size is that of q2k_index however unevenly keys are chosen.
    A handful of device ops (sort, searchsorted), no Python loop over tiles.
    """
    B, H, n_q_tiles, K = q2k_index.shape
    valid = torch.arange(K, device=q2k_index.device) < q2k_count[..., None]  # [B, H, n_q, K]
    # Unused slots get the key n_kv_tiles so that they sort past every real key tile.
    key = torch.where(valid, q2k_index, n_kv_tiles).reshape(B * H, n_q_tiles * K)
    # A stable sort keeps the query tiles of each key tile ascending: a fixed summation order.
    sorted_key, order = torch.sort(key, dim=-1, stable=True)
    q_tiles = torch.div(order, K, rounding_mode="floor").to(torch.int32)
    bounds = torch.arange(n_kv_tiles + 1, device=key.device, dtype=key.dtype).expand(B * H, -1).contiguous()
    offsets = torch.searchsorted(sorted_key, bounds).to(torch.int32)
    return offsets.view(B, H, n_kv_tiles + 1), q_tiles.view(B, H, n_q_tiles * K)
