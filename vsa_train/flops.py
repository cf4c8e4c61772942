"""Analytic training FLOPs per sample (docs/design.md, 'FLOPs'), the x-axis of every loss curve.

Counted: 2 FLOPs per multiply-add of every weight matmul (patch embedding, time and text embeddings,
AdaLN time projection, q/k/v/out projections of self- and cross-attention, MLP, output layer), plus
4·S·S_att·d per self-attention layer (QKᵀ and PV; S_att keys per query) and 4·S·L·d per cross-attention
layer. Norms, RoPE, activations and softmax are not counted (as in FlopCounterMode). Training = 3 × forward
(backward = 2 × forward; activation recompute is not counted).

VSA layers (not those in `dense_layers`) count S_att = the real keys of the `topk` tiles in force (at the mean
tile size; exact for tile_window's fixed pattern), the coarse stage's tile-level matmuls (2·tiles²·d each: the
scores, and P·V_c when the coarse output is used, so 4·tiles²·d for VSA) and the gate projections (2·S·d² each).
Tile means, top-k and the index building are not counted. `dense` is the same model with dense attention.

model=wan (a diffusers WanTransformer3DModel) has the same matmuls under other names, so the same count: Conv3d
patch embedding, time MLP (freq_dim -> d -> d) and its 6·d projection, two-layer text projection, per block
q/k/v/out of attn1, q/out of attn2 per video token and its k/v per text token, the FFN (d -> ffn_dim -> d) and
proj_out; ffn_dim is `mlp_hidden`. VSA on Wan is the op (coarse + fine, top-k, one coarse gate per block).
"""
import math
from typing import NamedTuple

from .models import DiTConfig, WanConfig, model_config, vsa_config
from .models.vsa import VSAConfig


class FlopsCount(NamedTuple):
    """FLOPs actually executed and those of the same model with dense attention."""

    executed: float
    dense: float


def forward_flops(cfg: DiTConfig | WanConfig, *, in_channels: int, text_dim: int, video_shape, text_len: int,
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


def sparse_attention_flops(vcfg: VSAConfig, grid, d: int, topk: int) -> float:
    """Forward FLOPs of one VSA self-attention core on one sample (fine stage, coarse stage, gates)."""
    S, n = math.prod(grid), math.prod(-(-g // t) for g, t in zip(grid, vcfg.tile))
    fine = 4 * S * vcfg.keys_per_query(grid, topk) * d
    coarse = vcfg.coarse_matmuls() * 2 * n * n * d
    gates = (int(vcfg.gate_coarse and vcfg.coarse) + int(vcfg.gate_fine and vcfg.fine)) * 2 * S * d * d
    return float(fine + coarse + gates)


def training_flops_per_sample(model_cfg, attn_cfg, *, in_channels: int, text_dim: int, video_shape,
                              text_len: int, topk: int | None = None) -> FlopsCount:
    """Training FLOPs (forward × 3) of one sample of video_shape = (frames, height, width) of the model input.

    topk: key tiles per query tile in force (VSA); None = the config's target.
    """
    cfg = model_config(model_cfg)  # a DiTConfig or a WanConfig
    vcfg = vsa_config(attn_cfg)  # None for dense; an unknown name fails listing the choices
    dense_fwd = forward_flops(cfg, in_channels=in_channels, text_dim=text_dim, video_shape=video_shape,
                              text_len=text_len)
    if vcfg is None:
        return FlopsCount(executed=3 * dense_fwd, dense=3 * dense_fwd)
    grid = tuple(n // p for n, p in zip(video_shape, cfg.patch_size))
    S, tiles = math.prod(grid), math.prod(-(-g // t) for g, t in zip(grid, vcfg.tile))
    topk = vcfg.topk_in_force(tiles) if topk is None else topk
    sparse_layers = cfg.depth - len(set(vcfg.dense_layers))
    per_layer = sparse_attention_flops(vcfg, grid, cfg.hidden_size, topk) - 4 * S * S * cfg.hidden_size
    return FlopsCount(executed=3 * (dense_fwd + sparse_layers * per_layer), dense=3 * dense_fwd)
