"""The Wan-style video Diffusion Transformer: single-device model code, no parallelism.

See docs/design.md, 'The model family'.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..fields import ConfigError, Section, flag, int_list, integer, positive, read_or_raise, setting, text
from .attention import AttnContext, CrossAttention, DenseConfig, SelfAttention, attn_config
from .embed import PatchEmbed, TextProjection, TimestepEmbedder, unpatchify
from .rope import rope_tables
from .vsa import VSAAttention


# Activation checkpointing policies. selective recomputes every other block: about half of full's memory
# saving for half its recompute (one block forward per two blocks), the cheapest way for dit_1b at 16K tokens
# to leave room on an 80 GB card.
CHECKPOINTING = ("none", "full", "selective")


def checkpointing_policy(value) -> str:
    """model.grad_checkpointing as a policy name: older configs' booleans read as full (true) and none (false)."""
    return {True: "full", False: "none"}[value] if isinstance(value, bool) else value


@dataclass(frozen=True)
class DiTConfig(Section):
    """Architecture of one model size: the keys of the `model` config group, each with its rule."""

    name: str = text()
    hidden_size: int = integer()
    depth: int = integer()
    num_heads: int = integer()
    mlp_ratio: float = positive(4.0)
    patch_size: tuple[int, int, int] = int_list(3, 1, (1, 2, 2), "3 positive integers [t, h, w]")
    qk_norm: bool = flag(True)
    # none | full (every block) | selective (every other block); older configs' booleans read as full / none
    grad_checkpointing: str = setting("none", ok=lambda v: v in CHECKPOINTING or isinstance(v, bool),
                                      allowed="one of " + ", ".join(CHECKPOINTING), convert=checkpointing_policy)
    rope_theta: float = positive(10000.0)
    freq_dim: int = integer(256)  # sinusoid channels of the time embedding

    @classmethod
    def from_cfg(cls, model_cfg) -> "DiTConfig":
        """The config from a dict or DictConfig (or itself); ConfigError listing every bad key or value."""
        return read_or_raise(cls, model_cfg, "model")

    def validate(self) -> list[str]:
        if self.hidden_size % self.num_heads:
            return [f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"]
        if self.head_dim % 2:
            return [f"model.hidden_size / model.num_heads = {self.head_dim} must be even (rotary embedding)"]
        return []

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def attn_problems(cfg: DiTConfig, attn_cfg) -> list[str]:
    """Why an `attn` config does not fit this DiT: dense layers outside its blocks."""
    layers = getattr(attn_config(attn_cfg), "dense_layers", ())
    if any(i >= cfg.depth for i in layers):
        return [f"attn.dense_layers must be a list of block indices in [0, model.depth={cfg.depth}), "
                f"got {list(layers)}"]
    return []


class Mlp(nn.Module):
    """Two-layer GELU (tanh) feed-forward."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, S, d]


class DiTBlock(nn.Module):
    """Self-attention, text cross-attention and MLP, with AdaLN shift/scale/gate from the flow time."""

    def __init__(self, cfg: DiTConfig, attn_cfg):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(d, cfg.num_heads, attn_cfg, qk_norm=cfg.qk_norm)
        self.norm_cross = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = CrossAttention(d, cfg.num_heads, qk_norm=cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        # Per-block modulation table, added to the shared time projection (Wan).
        self.modulation = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(self, x, t_mod, text, text_mask, ctx: AttnContext) -> torch.Tensor:
        mod = (self.modulation + t_mod).unbind(1)  # 6 x [B, d]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m[:, None, :] for m in mod)  # [B, 1, d]
        h = self.norm1(x) * (1 + scale_msa) + shift_msa  # [B, S, d]
        x = x + gate_msa * self.attn(h, ctx)  # [B, S, d]
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)  # [B, S, d]
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp  # [B, S, d]
        return x + gate_mlp * self.mlp(h)  # [B, S, d]


class FinalLayer(nn.Module):
    """Last AdaLN and the zero-initialised projection of each token back to a patch of output channels."""

    def __init__(self, d: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.modulation = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.linear = nn.Linear(d, out_dim)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + t_emb[:, None, :]).unbind(1)  # [B, d] each
        x = self.norm(x) * (1 + scale[:, None, :]) + shift[:, None, :]  # [B, S, d]
        return self.linear(x)  # [B, S, C*pt*ph*pw]


class VideoDiT(nn.Module):
    """Video DiT predicting the rectified-flow velocity v [B, C, T, H, W] of a noisy video x_t at time t."""

    def __init__(self, cfg: DiTConfig, attn_cfg, *, in_channels: int, text_dim: int):
        super().__init__()
        self.cfg, self.in_channels = cfg, in_channels
        d = cfg.hidden_size
        attn_cfg = attn_config(attn_cfg)
        if bad := attn_problems(cfg, attn_cfg):
            raise ConfigError(bad)
        dense_layers = sorted(getattr(attn_cfg, "dense_layers", ()))
        sparse_layers = [i for i in range(cfg.depth) if i not in dense_layers]
        # The whole network keeps the token order of its (non-dense) attention cores; dense ones take any order.
        self.order_layer = sparse_layers[0] if sparse_layers else 0
        self.patch_embed = PatchEmbed(in_channels, d, cfg.patch_size)
        self.time_embed = TimestepEmbedder(d, cfg.freq_dim)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # shared by all blocks
        self.text_embed = TextProjection(text_dim, d)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, DenseConfig("dense") if i in dense_layers else attn_cfg) for i in range(cfg.depth)
        )
        self.final = FinalLayer(d, in_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
        # Sequence parallelism (vsa_train/parallel.py) sets this: it splits tokens over ranks after the
        # permutation and gathers them before unpatchify. None: all tokens on this device.
        self.token_shard = None
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears with zero bias (DiT); the output projection zero, so a fresh model predicts v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        for m in self.modules():
            if isinstance(m, VSAAttention):
                m.reset_gates()  # new attention weights start neutral: an adapted dense model starts as it was

    def set_sparsity_limit(self, limit: float) -> None:
        """The sparsity schedule's limit in force (1 = the configured target) for every VSA layer."""
        for m in self.modules():
            if isinstance(m, VSAAttention):
                m.limit = float(limit)

    def _recompute(self, i: int) -> bool:
        """Whether block i's activations are recomputed in the backward (model.grad_checkpointing)."""
        policy = self.cfg.grad_checkpointing
        if policy == "none" or not (self.training and torch.is_grad_enabled()):
            return False
        return policy == "full" or i % 2 == 0

    def context(self, grid: tuple[int, int, int], device) -> AttnContext:
        """Token grid, order and RoPE angles shared by all layers of one forward (tables cached per shape)."""
        positions, cos, sin = rope_tables(tuple(grid), self.cfg.head_dim, self.cfg.rope_theta, device)  # raster
        order = self.blocks[self.order_layer].attn.core.token_order(grid, device)
        if order is not None:  # gathering the raster tables equals computing them on the permuted positions
            positions, cos, sin = positions[order], cos[order], sin[order]  # [S, 3], [S, D/2], [S, D/2]
        return AttnContext(grid, positions, order, cos, sin)

    def forward(self, x, t, text, text_mask=None) -> torch.Tensor:
        """x [B, C, T, H, W], t [B] in [0, 1], text [B, L, text_dim], text_mask [B, L] bool or None."""
        _, C, T, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        if C != self.in_channels or T % pt or H % ph or W % pw:
            raise ValueError(
                f"video of shape {tuple(x.shape)} needs {self.in_channels} channels and (T, H, W) divisible by "
                f"the patch size {self.cfg.patch_size}"
            )
        grid = (T // pt, H // ph, W // pw)
        ctx = self.context(grid, x.device)
        x = self.patch_embed(x)  # [B, S, d] raster order
        if ctx.order is not None:
            x = x[:, ctx.order]  # [B, S, d] in the attention's order, once for the whole network
        t_emb = self.time_embed(t)  # [B, d]
        t_mod = self.time_proj(t_emb).unflatten(1, (6, -1))  # [B, 6, d]
        text = self.text_embed(text)  # [B, L, d]
        if self.token_shard is not None:
            x, ctx = self.token_shard.split(x, ctx)  # [B, S/N, d]: this rank's tokens
        for i, block in enumerate(self.blocks):
            if self._recompute(i):
                x = checkpoint(block, x, t_mod, text, text_mask, ctx, use_reentrant=False)  # [B, S, d]
            else:
                x = block(x, t_mod, text, text_mask, ctx)  # [B, S, d]
        x = self.final(x, t_emb)  # [B, S, C*pt*ph*pw]
        if self.token_shard is not None:
            x = self.token_shard.gather(x)  # [B, S, C*pt*ph*pw]: all tokens again
        if ctx.order is not None:
            x = torch.empty_like(x).index_copy_(1, ctx.order, x)  # back to raster order
        return unpatchify(x, grid, self.cfg.patch_size, C)  # [B, C, T, H, W]
