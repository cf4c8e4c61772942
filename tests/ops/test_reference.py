"""PyTorch reference (fine stage and whole op) against the float64 mask-based naive implementation."""
import math

import pytest
import torch
import torch.nn.functional as F
from ops_utils import output_and_grads, random_inputs, rel_err

from vsa_train.ops import (
    TileLayout,
    block_sparse_attention_torch,
    local_tile_mask,
    naive_block_sparse_attention,
    naive_video_sparse_attention,
    q2k_from_mask,
    tile_mean,
    video_sparse_attention,
)

SHAPES = [(2, 4, 4), (4, 8, 8), (5, 6, 7), (1, 13, 2)]  # 1, 4, 8, 4 tiles; the last two mostly edge tiles
TOPKS = [1, 3, 1000]  # one tile, some, all
B, H, D = 2, 2, 64
# fp32 is compared with float64 at a bound far under the 1e-3 of docs/design.md, 'VSA: op contract'.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def random_selection(B, H, n_tiles, K, seed=0):
    """Distinct key tiles per query tile, ragged counts in [1, K], garbage past the count."""
    g = torch.Generator().manual_seed(seed)
    index = torch.rand(B, H, n_tiles, n_tiles, generator=g).argsort(-1)[..., :K].to(torch.int32)
    count = torch.randint(1, K + 1, (B, H, n_tiles), generator=g, dtype=torch.int32)
    index[torch.arange(K) >= count[..., None]] = -7
    return index, count


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("video_shape,tile,head_dim", [((5, 6, 7), (4, 4, 4), 64), ((4, 8, 8), (2, 4, 4), 16)])
@pytest.mark.parametrize("qk_scale", [1.0, 4.0])
def test_fine_stage_matches_naive(dtype, video_shape, tile, head_dim, qk_scale):
    layout = TileLayout(video_shape, tile)
    n, K = layout.n_tiles, 3
    sizes = layout.kv_tile_sizes()
    index, count = random_selection(B, H, n, K)
    inputs = random_inputs(B, layout.padded_len, H, head_dim, qk_scale=qk_scale)  # pad rows: random garbage
    real = layout.positions()[1]  # [S_pad]; pad query rows are unspecified and not compared

    def fine(impl):
        def fn(q, k, v):
            return impl(q, k, v, index, count, sizes)[0] * real[:, None, None]  # pad query rows dropped
        return fn

    out, grads = output_and_grads(fine(block_sparse_attention_torch), inputs, dtype)
    ref, ref_grads = output_and_grads(fine(naive_block_sparse_attention), inputs, torch.float64)
    lse = block_sparse_attention_torch(*(inputs[n].to(dtype) for n in "qkv"), index, count, sizes)[1]
    ref_lse = naive_block_sparse_attention(*inputs.values(), index, count, sizes)[1]
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, layout.padded_len)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(lse[..., real], ref_lse[..., real]) < 1e-6  # lse is float32 by contract
    for name in "qkv":
        assert rel_err(grads[name], ref_grads[name]) < TOL[dtype], name
    # Pad key rows are never attended to, so they get no gradient.
    assert torch.all(grads["k"][:, ~real] == 0) and torch.all(grads["v"][:, ~real] == 0)


@pytest.mark.parametrize("video_shape", SHAPES)
@pytest.mark.parametrize("topk", TOPKS)
@pytest.mark.parametrize("qk_scale", [1.0, 4.0])
def test_vsa_matches_naive_float64(video_shape, topk, qk_scale):
    names = ("q", "k", "v", "gate_coarse", "gate_fine")
    inputs = random_inputs(B, math.prod(video_shape), H, D, names, qk_scale=qk_scale, seed=topk)

    def run(impl):
        return lambda **x: impl(video_shape=video_shape, topk=topk, **x)

    out, grads = output_and_grads(run(video_sparse_attention), inputs, torch.float64)
    ref, ref_grads = output_and_grads(run(naive_video_sparse_attention), inputs, torch.float64)
    assert rel_err(out, ref) < 1e-12
    for name in names:
        assert rel_err(grads[name], ref_grads[name]) < 1e-12, name


@pytest.mark.parametrize("qk_scale", [1.0, 4.0])
def test_vsa_float32_matches_naive_float64(qk_scale):
    video_shape, topk = (5, 6, 7), 3
    names = ("q", "k", "v", "gate_coarse", "gate_fine")
    inputs = random_inputs(B, math.prod(video_shape), H, D, names, qk_scale=qk_scale)

    def run(impl):
        return lambda **x: impl(video_shape=video_shape, topk=topk, **x)

    out, grads = output_and_grads(run(video_sparse_attention), inputs, torch.float32)
    # The float64 reference sees exactly the float32 values.
    ref, ref_grads = output_and_grads(run(naive_video_sparse_attention), {n: x.float() for n, x in inputs.items()},
                                      torch.float64)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    for name in names:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("video_shape", [(4, 8, 8), (5, 6, 7)])
def test_all_tiles_without_coarse_is_dense_attention(video_shape):
    S = math.prod(video_shape)
    x = random_inputs(B, S, H, D, ("q", "k", "v"), qk_scale=2.0)
    out = video_sparse_attention(**x, video_shape=video_shape, topk=10**6,
                                 gate_coarse=torch.zeros(B, S, H, D, dtype=torch.float64))
    q, k, v = (x[n].transpose(1, 2) for n in "qkv")  # [B, H, S, D]
    dense = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert rel_err(out, dense) < 1e-12


def test_tile_mean_ignores_pad_rows():
    layout = TileLayout((5, 6, 7))
    x = random_inputs(B, layout.seq_len, H, 8, ("x",))["x"]
    tiled = layout.to_tiles(x)
    tiled[:, ~layout.positions()[1]] = 1e3  # pad rows may hold anything finite
    pooled = tile_mean(tiled, layout.kv_tile_sizes())
    sizes = layout.kv_tile_sizes().tolist()
    rows = tiled.view(B, layout.n_tiles, layout.block, H, 8)
    expected = torch.stack([rows[:, i, : sizes[i]].mean(1) for i in range(layout.n_tiles)], 1)
    assert rel_err(pooled, expected) < 1e-14


def test_selection_from_mask():
    layout = TileLayout((8, 8, 12))  # 2 x 2 x 3 tiles
    mask = local_tile_mask(layout, radius=(0, 1, 1))
    # Direct definition: tiles at the same t and at most one tile apart along h and w.
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in layout.grid), indexing="ij")
    t, h, w = t.flatten(), h.flatten(), w.flatten()
    expected = (t[:, None] == t) & ((h[:, None] - h).abs() <= 1) & ((w[:, None] - w).abs() <= 1)
    assert torch.equal(mask, expected)

    index, count = q2k_from_mask(mask.expand(B, H, -1, -1))
    assert index.dtype == count.dtype == torch.int32
    assert torch.equal(count[0, 0], mask.sum(-1).int()) and index.shape[-1] == int(mask.sum(-1).max())
    rebuilt = torch.zeros_like(mask)
    for i in range(layout.n_tiles):
        rebuilt[i, index[1, 1, i, : count[1, 1, i]].long()] = True
    assert torch.equal(rebuilt, mask)


def test_selection_from_mask_rejects_empty_rows():
    mask = torch.eye(3, dtype=torch.bool)
    mask[1, 1] = False
    with pytest.raises(ValueError, match="selects no key tile"):
        q2k_from_mask(mask)
    with pytest.raises(ValueError, match="must be a bool tensor"):
        q2k_from_mask(mask.float())
