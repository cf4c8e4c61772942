"""3D rotary position embedding: the head dim is split across the (t, h, w) axes of the token grid."""
import torch

_TABLES: dict = {}


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to the t, h and w axes (Wan's split: h and w get 1/3 each, t the rest)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def grid_positions(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """(t, h, w) coordinates of every token of a grid in raster order: [T*H*W, 3] int64."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos and sin of the rotation angles for tokens at `positions` [S, 3]: two [S, head_dim // 2] fp32 tensors."""
    angles = []
    for axis, dim in enumerate(rope_axis_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)  # [dim/2]
        angles.append(positions[:, axis, None].float() * freqs)  # [S, dim/2]
    angles = torch.cat(angles, dim=-1)  # [S, head_dim/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by the angles of its tokens (rotate-half pairing: channel i with i + D/2)."""
    cos = cos[:, None, :].to(x.dtype)  # [S, 1, D/2]: broadcast over heads
    sin = sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # [B, S, H, D/2] each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # [B, S, H, D]


# torch.compile takes the tables as constants (as the VSA layout's), so a bucketed run traces none of their construction.
@torch.compiler.assume_constant_result
def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float, device):
    """(positions [S, 3], cos, sin [S, head_dim // 2]) of a grid in raster order, built once per (shape, device)."""
    key = (tuple(grid), head_dim, float(theta), torch.device(device))
    if key not in _TABLES:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, whichever mode asks first
            positions = grid_positions(key[0], key[3])  # [S, 3]
            _TABLES[key] = (positions, *rope_cos_sin(positions, head_dim, theta))
    return _TABLES[key]
