"""TileLayout: raster <-> padded tile order, tile sizes, positions, caching, errors."""
import math

import pytest
import torch

from vsa_train.ops import TileLayout

CASES = [  # (video_shape, tile)
    ((2, 4, 4), (4, 4, 4)),
    ((4, 8, 8), (4, 4, 4)),
    ((5, 6, 7), (4, 4, 4)),
    ((1, 1, 1), (4, 4, 4)),
    ((3, 9, 2), (4, 4, 4)),
    ((4, 8, 8), (2, 4, 4)),
    ((5, 6, 7), (1, 2, 3)),
]


def raster_coords(video_shape):
    """(t, h, w) of each raster token, [S, 3]."""
    grids = torch.meshgrid(*(torch.arange(n) for n in video_shape), indexing="ij")
    return torch.stack(grids, -1).reshape(-1, 3)


@pytest.mark.parametrize("video_shape,tile", CASES)
def test_counts_and_sizes(video_shape, tile):
    layout = TileLayout(video_shape, tile)
    grid = tuple(math.ceil(n / t) for n, t in zip(video_shape, tile))
    assert layout.grid == grid
    assert layout.n_tiles == math.prod(grid)
    assert layout.block == math.prod(tile)
    assert layout.seq_len == math.prod(video_shape)
    assert layout.padded_len == layout.n_tiles * layout.block

    sizes = layout.kv_tile_sizes()
    assert sizes.dtype == torch.int32 and sizes.shape == (layout.n_tiles,)
    # Each tile's size is the product of its sides clipped to the grid, tiles in raster order.
    expected = [
        math.prod(min(t, n - i * t) for i, n, t in zip((a, b, c), video_shape, tile))
        for a in range(grid[0]) for b in range(grid[1]) for c in range(grid[2])
    ]
    assert sizes.tolist() == expected
    assert int(sizes.sum()) == layout.seq_len


@pytest.mark.parametrize("video_shape,tile", CASES)
def test_round_trip_and_order(video_shape, tile):
    layout = TileLayout(video_shape, tile)
    x = torch.randn(2, layout.seq_len, 3, 5)
    tiled = layout.to_tiles(x)
    assert tiled.shape == (2, layout.padded_len, 3, 5)
    assert torch.equal(layout.from_tiles(tiled), x)

    # Real rows are the first kv_tile_sizes[i] of tile i; pad rows are zero.
    real = torch.arange(layout.block) < layout.kv_tile_sizes()[:, None]  # [n, block]
    assert torch.all(tiled.view(2, layout.n_tiles, layout.block, 3, 5)[:, ~real] == 0)

    # Tile i holds exactly the tokens of tile i (raster over the tile grid), in raster order inside it.
    coords = raster_coords(video_shape)
    index = layout.to_tiles(torch.arange(layout.seq_len)[None, :, None] + 1)[0, :, 0] - 1  # [S_pad], -1 = pad
    index = index.view(layout.n_tiles, layout.block)
    tile_of = coords // torch.tensor(tile)
    tile_id = (tile_of[:, 0] * layout.grid[1] + tile_of[:, 1]) * layout.grid[2] + tile_of[:, 2]
    for i in range(layout.n_tiles):
        rows = index[i][real[i]]
        assert torch.equal(rows, (tile_id == i).nonzero().flatten())  # ascending raster index = raster order


@pytest.mark.parametrize("video_shape,tile", CASES)
def test_positions(video_shape, tile):
    layout = TileLayout(video_shape, tile)
    positions, valid = layout.positions()
    assert positions.shape == (layout.padded_len, 3) and valid.shape == (layout.padded_len,)
    real = torch.arange(layout.block) < layout.kv_tile_sizes()[:, None]
    assert torch.equal(valid, real.flatten())
    coords = raster_coords(video_shape)
    assert torch.equal(positions[valid], layout.to_tiles(coords[None])[0][valid])
    # Pad rows carry in-range coordinates of their own tile (safe to feed to RoPE tables).
    tile_of = (positions // torch.tensor(tile)).view(layout.n_tiles, layout.block, 3)
    assert torch.equal(tile_of, tile_of[:, :1].expand_as(tile_of))
    assert torch.all(positions < torch.tensor(video_shape))


@pytest.mark.parametrize("video_shape,tile", CASES)
def test_raster_tokens_invert_padded_rows(video_shape, tile):
    layout = TileLayout(video_shape, tile)
    tokens = layout.raster_tokens()
    assert tokens.dtype == torch.int32 and tokens.shape == (layout.padded_len,)
    assert torch.equal(tokens[layout.padded_rows()].long(), torch.arange(layout.seq_len))
    assert torch.equal(tokens >= 0, layout.positions()[1])  # -1 exactly on the pad rows


def test_tables_are_cached_and_differentiable():
    layout = TileLayout((5, 6, 7))
    assert layout.padded_rows() is TileLayout((5, 6, 7)).padded_rows()
    x = torch.randn(1, layout.seq_len, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layout.from_tiles(layout.to_tiles(t) * 2), (x,))


@pytest.mark.parametrize(
    "video_shape,tile,match",
    [
        ((4, 8), (4, 4, 4), "video_shape must be 3 positive ints"),
        ((0, 8, 8), (4, 4, 4), "video_shape must be 3 positive ints"),
        ((4, 8, 8.0), (4, 4, 4), "video_shape must be 3 positive ints"),
        ((4, 8, 8), (4, 0, 4), "tile must be 3 positive ints"),
        (16, (4, 4, 4), "video_shape must be 3 positive ints"),
    ],
)
def test_bad_layout(video_shape, tile, match):
    with pytest.raises(ValueError, match=match):
        TileLayout(video_shape, tile)


def test_wrong_length():
    layout = TileLayout((4, 8, 8))
    with pytest.raises(ValueError, match=r"expected a tensor \[B, 256, ...\] in raster order"):
        layout.to_tiles(torch.zeros(1, 255, 2))
    with pytest.raises(ValueError, match=r"expected a tensor \[B, 256, ...\] in padded tile order"):
        layout.from_tiles(torch.zeros(1, 200, 2))
