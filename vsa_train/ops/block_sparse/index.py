"""The key->query index (CSR) that lets dK/dV be computed per key tile without atomics.

Built once per forward by two small Triton kernels (mark the chosen (key tile, query tile) pairs, then
compact each key tile's row into its slice of the CSR list) and two torch reductions for the offsets.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def mark_selected_kernel(
    Q2K_INDEX, Q2K_COUNT, SELECTED,  # int32 [BH, n_q, max_k], int32 [BH, n_q], uint8 [BH, n_kv, n_q] zeroed
    n_q_tiles, n_kv_tiles, max_k,
    BLOCK_K: tl.constexpr,
):
    """One program = one query tile: SELECTED[bh, j, i] = 1 for each key tile j that query tile i chose."""
    q_tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = bh * n_q_tiles + q_tile
    count = tl.load(Q2K_COUNT + row)
    for start in range(0, count, BLOCK_K):
        slot = start + tl.arange(0, BLOCK_K)
        used = slot < count  # entries past the count may hold anything
        kv_tile = tl.load(Q2K_INDEX + row * max_k + slot, mask=used, other=0)
        tl.store(SELECTED + (bh * n_kv_tiles + kv_tile) * n_q_tiles + q_tile, tl.full([BLOCK_K], 1, tl.uint8), mask=used)


@triton.jit
def compact_selected_kernel(
    SELECTED, K2Q_OFFSETS, K2Q_Q_TILES,  # uint8 [BH, n_kv, n_q], int32 [BH, n_kv + 1], int32 [BH, n_q * max_k]
    n_q_tiles, n_kv_tiles, width,
    BLOCK_Q: tl.constexpr,
):
    """One program = one key tile: write the query tiles that chose it, ascending, at its CSR offset."""
    kv_tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    selected_row = SELECTED + (bh * n_kv_tiles + kv_tile) * n_q_tiles
    out = K2Q_Q_TILES + bh * width + tl.load(K2Q_OFFSETS + bh * (n_kv_tiles + 1) + kv_tile)
    written = 0
    for start in range(0, n_q_tiles, BLOCK_Q):
        q_tile = start + tl.arange(0, BLOCK_Q)
        chosen = tl.load(selected_row + q_tile, mask=q_tile < n_q_tiles, other=0).to(tl.int32)
        position = written + tl.cumsum(chosen, 0) - chosen  # exclusive prefix sum: rank among the chosen
        tl.store(out + position, q_tile, mask=chosen > 0)
        written += tl.sum(chosen, 0)


def build_k2q_index(q2k_index: torch.Tensor, q2k_count: torch.Tensor, n_kv_tiles: int):
    """Invert q2k (query tile -> its key tiles) into k2q (key tile -> the query tiles that chose it).

    Returns (k2q_offsets int32 [B, H, n_kv_tiles + 1], k2q_q_tiles int32 [B, H, n_q_tiles * K]): the query
    tiles of key tile j are k2q_q_tiles[b, h, k2q_offsets[b, h, j]:k2q_offsets[b, h, j + 1]], ascending
    (a fixed summation order for dK/dV). The layout is compressed (CSR), so its size is that of q2k_index
    however unevenly the key tiles are chosen; entries past the last offset are unspecified.
    """
    B, H, n_q_tiles, K = q2k_index.shape
    q2k_index, q2k_count = q2k_index.contiguous(), q2k_count.contiguous()
    selected = torch.zeros(B * H, n_kv_tiles, n_q_tiles, dtype=torch.uint8, device=q2k_index.device)
    mark_selected_kernel[(n_q_tiles, B * H)](
        q2k_index, q2k_count, selected, n_q_tiles, n_kv_tiles, K,
        BLOCK_K=min(triton.next_power_of_2(K), 128),
    )
    offsets = torch.zeros(B * H, n_kv_tiles + 1, dtype=torch.int32, device=q2k_index.device)
    torch.cumsum(selected.sum(-1, dtype=torch.int32), dim=-1, out=offsets[:, 1:])
    q_tiles = torch.empty(B * H, n_q_tiles * K, dtype=torch.int32, device=q2k_index.device)
    compact_selected_kernel[(n_kv_tiles, B * H)](
        selected, offsets, q_tiles, n_q_tiles, n_kv_tiles, n_q_tiles * K,
        BLOCK_Q=min(triton.next_power_of_2(n_q_tiles), 1024),
    )
    return offsets.view(B, H, n_kv_tiles + 1), q_tiles.view(B, H, n_q_tiles * K)
