"""Input and conditioning embeddings: video patches, flow time, text."""
import math

import torch
import torch.nn as nn


class PatchEmbed(nn.Module):
    """Cuts a video [B, C, T, H, W] into non-overlapping (pt, ph, pw) patches and projects each to a token."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Linear(in_channels * math.prod(self.patch_size), hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)  # split each axis into (grid, patch)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, T', H', W', C, pt, ph, pw]
        x = x.reshape(B, -1, C * pt * ph * pw)  # [B, S, C*pt*ph*pw], tokens in raster order
        return self.proj(x)  # [B, S, d]


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch_size, channels: int) -> torch.Tensor:
    """Inverse of PatchEmbed's cut: tokens [B, S, C*pt*ph*pw] in raster order -> video [B, C, T, H, W]."""
    B = x.shape[0]
    (gt, gh, gw), (pt, ph, pw) = grid, patch_size
    x = x.reshape(B, gt, gh, gw, channels, pt, ph, pw)  # [B, T', H', W', C, pt, ph, pw]
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, T', pt, H', ph, W', pw]
    return x.reshape(B, channels, gt * pt, gh * ph, gw * pw)  # [B, C, T, H, W]


class TimestepEmbedder(nn.Module):
    """Embeds the flow time t in [0, 1] by sinusoids of 1000*t followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs  # [B, freq_dim/2]: the scale of the usual 0..1000 timesteps
        emb = torch.cat([args.cos(), args.sin()], dim=-1)  # [B, freq_dim]
        return self.mlp(emb)  # [B, d]


class TextProjection(nn.Module):
    """Maps caption-encoder features [B, L, text_dim] into the model width (once per forward, shared by blocks)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(text)  # [B, L, d]
