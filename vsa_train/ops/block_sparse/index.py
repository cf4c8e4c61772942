"""The key->query index (CSR) that lets dK/dV be computed per key tile without atomics on the gradients.

Built once per forward in four launches, with no host synchronisation and fixed shapes (CUDA-graph and
torch.compile safe): two zero fills, then `mark_selected_kernel` (one program per query tile: mark each
chosen (key tile, query tile) pair in a dense byte matrix and count the choices of each key tile with
integer atomics, whose sums are order-independent) and `compact_selected_kernel` (one program per key
tile: its CSR offset is the sum of the counts of the key tiles before it; write the query tiles that
chose it there, ascending). The dense matrix is n_kv x n_q bytes per (batch, head): 0.6 MB per head at
49,152 tokens. (A sort + searchsorted version took about ten launches.)
"""
import torch
import triton
import triton.language as tl

from ..launch import device_guard

# Vector widths of the loops over a query tile's slots and over tiles: fixed, so that one compiled kernel
# serves every video size and topk (tests lower them to exercise the loops).
BLOCK_SLOTS = 32
BLOCK_TILES = 256


# Size arguments are not specialised on (== 1, divisible by 16): one compile serves every video size.
@triton.jit(do_not_specialize=["n_q_tiles", "n_kv_tiles", "max_k"])
def mark_selected_kernel(
    Q2K_INDEX, Q2K_COUNT, SELECTED, COUNTS,  # int32 [BH, n_q, max_k], [BH, n_q]; uint8 [BH, n_kv, n_q], int32 [BH, n_kv] zeroed
    n_q_tiles, n_kv_tiles, max_k,
    BLOCK_K: tl.constexpr,
):
    """One program = one query tile: SELECTED[bh, j, i] = 1 and COUNTS[bh, j] += 1 for each key tile j it chose."""
    q_tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = bh * n_q_tiles + q_tile
    count = tl.load(Q2K_COUNT + row)
    for start in range(0, count, BLOCK_K):
        slot = start + tl.arange(0, BLOCK_K)
        used = slot < count  # entries past the count may hold anything
        kv_tile = tl.load(Q2K_INDEX + row * max_k + slot, mask=used, other=0)
        tl.store(SELECTED + (bh * n_kv_tiles + kv_tile) * n_q_tiles + q_tile, tl.full([BLOCK_K], 1, tl.uint8),
                 mask=used)
        tl.atomic_add(COUNTS + bh * n_kv_tiles + kv_tile, tl.full([BLOCK_K], 1, tl.int32), mask=used)


@triton.jit(do_not_specialize=["n_q_tiles", "n_kv_tiles", "width"])
def compact_selected_kernel(
    SELECTED, COUNTS, K2Q_OFFSETS, K2Q_Q_TILES,  # uint8 [BH, n_kv, n_q], int32 [BH, n_kv], [BH, n_kv + 1], [BH, width]
    n_q_tiles, n_kv_tiles, width,
    BLOCK: tl.constexpr,
):
    """One program = one key tile: its CSR offset, and the query tiles that chose it, ascending, from there."""
    kv_tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    counts = COUNTS + bh * n_kv_tiles
    offset = 0
    for start in range(0, kv_tile, BLOCK):  # exclusive prefix sum of the counts, read from L2
        j = start + tl.arange(0, BLOCK)
        offset += tl.sum(tl.load(counts + j, mask=j < kv_tile, other=0), 0)
    offsets = K2Q_OFFSETS + bh * (n_kv_tiles + 1)
    tl.store(offsets + kv_tile, offset)
    if kv_tile == n_kv_tiles - 1:
        tl.store(offsets + n_kv_tiles, offset + tl.load(counts + kv_tile))

    selected_row = SELECTED + (bh * n_kv_tiles + kv_tile) * n_q_tiles
    out = K2Q_Q_TILES + bh * width + offset
    written = 0
    for start in range(0, n_q_tiles, BLOCK):
        q_tile = start + tl.arange(0, BLOCK)
        chosen = tl.load(selected_row + q_tile, mask=q_tile < n_q_tiles, other=0).to(tl.int32)
        position = written + tl.cumsum(chosen, 0) - chosen  # exclusive prefix sum: rank among the chosen
        tl.store(out + position, q_tile, mask=chosen > 0)
        written += tl.sum(chosen, 0)


def build_k2q_index(q2k_index: torch.Tensor, q2k_count: torch.Tensor, n_kv_tiles: int):
    """Invert q2k (query tile -> its key tiles) into k2q (key tile -> the query tiles that chose it).

    q2k_index int32 [B, H, n_q_tiles, K] (the first q2k_count[b, h, i] entries distinct tile ids),
    q2k_count int32 [B, H, n_q_tiles]. Returns (k2q_offsets int32 [B, H, n_kv_tiles + 1], k2q_q_tiles int32
    [B, H, n_q_tiles * K]): the query tiles of key tile j are
    k2q_q_tiles[b, h, k2q_offsets[b, h, j]:k2q_offsets[b, h, j + 1]], ascending (a fixed summation order for
    dK/dV). The layout is compressed (CSR), so its size is that of q2k_index however unevenly the key tiles
    are chosen; entries past the last offset are unspecified. Launches on the current CUDA device.
    """
    B, H, n_q_tiles, K = q2k_index.shape
    device = q2k_index.device
    selected = torch.zeros(B * H, n_kv_tiles, n_q_tiles, dtype=torch.uint8, device=device)
    counts = torch.zeros(B * H, n_kv_tiles, dtype=torch.int32, device=device)
    offsets = torch.empty(B * H, n_kv_tiles + 1, dtype=torch.int32, device=device)
    q_tiles = torch.empty(B * H, n_q_tiles * K, dtype=torch.int32, device=device)
    mark_selected_kernel[(n_q_tiles, B * H)](
        q2k_index.contiguous(), q2k_count.contiguous(), selected, counts, n_q_tiles, n_kv_tiles, K,
        BLOCK_K=BLOCK_SLOTS,
    )
    compact_selected_kernel[(n_kv_tiles, B * H)](
        selected, counts, offsets, q_tiles, n_q_tiles, n_kv_tiles, n_q_tiles * K,
        BLOCK=BLOCK_TILES,
    )
    return offsets.view(B, H, n_kv_tiles + 1), q_tiles.view(B, H, n_q_tiles * K)


def k2q_index_if(build: bool, q2k_index: torch.Tensor, q2k_count: torch.Tensor, n_kv_tiles: int):
    """build_k2q_index on q2k's device when build (a backward will follow: only it reads the index), else two
    distinct empty tensors (a custom op's outputs must not alias each other)."""
    if not build:
        return q2k_index.new_empty(0), q2k_index.new_empty(0)
    with device_guard(q2k_index):
        return build_k2q_index(q2k_index, q2k_count, n_kv_tiles)
