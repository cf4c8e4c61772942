"""Tile layout of a video token grid: raster order <-> padded tile order, tile sizes, token positions.

A (T, H, W) grid is cut into tiles of shape `tile` (edge tiles are smaller when a side is not a
multiple of the tile side). In *padded tile order* tiles follow each other in raster order over the
tile grid, the real tokens of a tile follow each other in raster order over the tile's own extent, and
each tile is padded at its end with zero rows up to `prod(tile)` rows. Tile i occupies rows
[block * i, block * (i + 1)) and its first `kv_tile_sizes[i]` rows are real.
"""
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from numbers import Integral

import torch

__all__ = ["TileLayout"]


def _as_triple(value, name: str) -> tuple[int, int, int]:
    """Validate a (T, H, W)-like triple of positive ints."""
    ok = isinstance(value, Sequence) and len(value) == 3
    ok = ok and all(isinstance(x, Integral) and not isinstance(x, bool) and x >= 1 for x in value)
    if not ok:
        raise ValueError(f"{name} must be 3 positive ints (t, h, w), got {value!r}")
    return tuple(int(x) for x in value)


@dataclass(frozen=True)
class TileLayout:
    """How the tokens of a `video_shape` grid are laid out in padded tile order with tiles of `tile`.

    The index tables behind it are built once per (video_shape, tile, device) and shared: don't modify
    the tensors its methods return in place.
    """

    video_shape: tuple[int, int, int]
    tile: tuple[int, int, int] = (4, 4, 4)

    def __post_init__(self):
        object.__setattr__(self, "video_shape", _as_triple(self.video_shape, "video_shape"))
        object.__setattr__(self, "tile", _as_triple(self.tile, "tile"))

    @property
    def grid(self) -> tuple[int, int, int]:
        """Number of tiles along t, h, w."""
        return tuple(-(-n // t) for n, t in zip(self.video_shape, self.tile))

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return prod(self.grid)

    @property
    def block(self) -> int:
        """Rows per tile in padded tile order (the tokens of a full tile)."""
        return prod(self.tile)

    @property
    def seq_len(self) -> int:
        """Tokens in raster order, S = T * H * W."""
        return prod(self.video_shape)

    @property
    def padded_len(self) -> int:
        """Rows in padded tile order, S_pad = n_tiles * block."""
        return self.n_tiles * self.block

    def kv_tile_sizes(self, device=None) -> torch.Tensor:
        """Real tokens per tile, int32 [n_tiles] (cached per device)."""
        return _tables(self.video_shape, self.tile, torch.device(device or "cpu"))[1]

    def padded_rows(self, device=None) -> torch.Tensor:
        """Row in padded tile order of each raster token, int64 [S] (cached per device)."""
        return _tables(self.video_shape, self.tile, torch.device(device or "cpu"))[0]

    def positions(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, h, w) of each padded row, int64 [S_pad, 3], and its validity, bool [S_pad].

        Pad rows get their tile's first coordinate (a real position; use the mask to tell them apart).
        """
        return _tables(self.video_shape, self.tile, torch.device(device or "cpu"))[2:4]

    def raster_tokens(self, device=None) -> torch.Tensor:
        """Raster token of each padded row, int32 [S_pad], -1 for pad rows (cached per device)."""
        return _tables(self.video_shape, self.tile, torch.device(device or "cpu"))[4]

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] in raster order -> [B, S_pad, ...] in padded tile order, pad rows zero."""
        self._check_len(x, self.seq_len, "raster order (S = T*H*W)")
        out = x.new_zeros((x.shape[0], self.padded_len, *x.shape[2:]))
        return out.index_copy(1, self.padded_rows(x.device), x)

    def from_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S_pad, ...] in padded tile order -> [B, S, ...] in raster order (pad rows dropped)."""
        self._check_len(x, self.padded_len, "padded tile order (S_pad = n_tiles * prod(tile))")
        return x.index_select(1, self.padded_rows(x.device))

    def _check_len(self, x: torch.Tensor, expected: int, what: str):
        if x.dim() < 2 or x.shape[1] != expected:
            raise ValueError(
                f"expected a tensor [B, {expected}, ...] in {what} for video_shape={self.video_shape}, "
                f"tile={self.tile}; got shape {tuple(x.shape)}"
            )


_TABLES: dict = {}


# torch.compile takes the tables as constants instead of tracing (and graph-breaking in) their construction.
@torch.compiler.assume_constant_result
def _tables(video_shape, tile, device):
    """Index tables of a layout, built once per (video_shape, tile, device) and cached."""
    key = (video_shape, tile, device)
    if key not in _TABLES:
        _TABLES[key] = _build_tables(video_shape, tile, device)
    return _TABLES[key]


def _build_tables(video_shape, tile, device):
    """(padded row of each raster token, tile sizes, positions of padded rows, their validity, their raster token)."""
    shape = torch.tensor(video_shape)
    tile = torch.tensor(tile)
    grid = -(-shape // tile)
    block = int(tile.prod())

    # Coordinates of every raster token, and of its tile and of its offset inside the tile.
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in video_shape), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)  # [S, 3]
    tile_coord, inner = coords // tile, coords % tile  # [S, 3], [S, 3]
    origin = tile_coord * tile  # [S, 3]
    extent = torch.minimum(tile, shape - origin)  # [S, 3]: sides of the (possibly edge) tile

    # Raster index of the tile on the tile grid, and raster index inside the tile's own extent.
    tile_id = (tile_coord[:, 0] * grid[1] + tile_coord[:, 1]) * grid[2] + tile_coord[:, 2]  # [S]
    offset = (inner[:, 0] * extent[:, 1] + inner[:, 1]) * extent[:, 2] + inner[:, 2]  # [S]
    rows = tile_id * block + offset  # [S]

    n_tiles = int(grid.prod())
    sizes = torch.zeros(n_tiles, dtype=torch.int64).index_add_(0, tile_id, torch.ones_like(tile_id))

    # Every padded row starts at its tile's origin; real rows then get their own coordinates.
    tile_grid = torch.stack(torch.meshgrid(*(torch.arange(int(g)) for g in grid), indexing="ij"), -1)
    positions = (tile_grid.reshape(-1, 1, 3) * tile).expand(n_tiles, block, 3).reshape(-1, 3).clone()
    positions[rows] = coords
    valid = torch.zeros(n_tiles * block, dtype=torch.bool)
    valid[rows] = True

    tokens = torch.full((n_tiles * block,), -1, dtype=torch.int32)
    tokens[rows] = torch.arange(rows.numel(), dtype=torch.int32)

    return (rows.to(device), sizes.to(device, torch.int32), positions.to(device), valid.to(device),
            tokens.to(device))
