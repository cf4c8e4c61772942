"""Analytic training FLOPs per sample (DESIGN.md §5), the x-axis of every loss curve.

Counted: 2 FLOPs per multiply-add of every weight matmul (patch embedding, time and text embeddings,
AdaLN time projection, q/k/v/out projections of self- and cross-attention, MLP, output layer), plus
4·S·S_att·d per self-attention layer (QKᵀ and PV; S_att keys per query) and 4·S·L·d per cross-attention
layer. Norms, RoPE, activations and softmax are not counted (as in FlopCounterMode). Training = 3 × forward
(backward = 2 × forward; activation recompute is not counted).
"""
import math
from typing import NamedTuple

from .models import DiTConfig


class FlopsCount(NamedTuple):
    """FLOPs actually executed and those of the same model with dense attention."""

    executed: float
    dense: float


def forward_flops(cfg: DiTConfig, *, in_channels: int, text_dim: int, video_shape, text_len: int,
                  keys_per_query: float | None = None) -> float:
    """Forward FLOPs of one sample; keys_per_query is S_att of self-attention (None: all S tokens, dense)."""
    d, depth = cfg.hidden_size, cfg.depth
    if any(n % p for n, p in zip(video_shape, cfg.patch_size)):
        raise ValueError(f"video shape {tuple(video_shape)} is not divisible by the patch size {cfg.patch_size}")
    S = math.prod(n // p for n, p in zip(video_shape, cfg.patch_size))  # video tokens
    L = text_len
    patch = in_channels * math.prod(cfg.patch_size)
    s_att = S if keys_per_query is None else keys_per_query

    per_sample = cfg.freq_dim * d + d * d + 6 * d * d  # time embedding MLP + shared AdaLN projection
    per_text_token = text_dim * d + d * d + depth * 2 * d * d  # text projection MLP + cross-attn k, v per block
    per_block_video = 3 * d * d + d * d + 2 * d * d + 2 * d * cfg.mlp_hidden  # qkv, out, cross q/out, MLP
    per_video_token = patch * d + depth * per_block_video + d * patch  # + patch embedding and output layer
    matmuls = 2 * (per_sample + L * per_text_token + S * per_video_token)
    attention = depth * (4 * S * s_att * d + 4 * S * L * d)
    return float(matmuls + attention)


def training_flops_per_sample(model_cfg, attn_cfg, *, in_channels: int, text_dim: int, video_shape,
                              text_len: int) -> FlopsCount:
    """Training FLOPs (forward × 3) of one sample of video_shape = (frames, height, width) of the model input."""
    cfg = DiTConfig.from_cfg(model_cfg)
    name = attn_cfg.get("name") if attn_cfg is not None else None
    if name != "dense":
        raise ValueError(f"no FLOPs formula for attention {name!r}; known: ['dense']")
    dense = 3 * forward_flops(cfg, in_channels=in_channels, text_dim=text_dim, video_shape=video_shape,
                              text_len=text_len)
    return FlopsCount(executed=dense, dense=dense)
