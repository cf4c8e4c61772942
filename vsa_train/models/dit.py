"""The Wan-style video Diffusion Transformer: single-device model code, no parallelism.

See docs/design.md, 'The model family'.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import AttnContext, CrossAttention, SelfAttention, attention_class
from .embed import PatchEmbed, TextProjection, TimestepEmbedder, unpatchify
from .rope import grid_positions, rope_cos_sin
from .vsa import VSAAttention


# Activation checkpointing policies. selective recomputes every other block: about half of full's memory
# saving for half its recompute (one block forward per two blocks), the cheapest way for dit_1b at 16K tokens
# to leave room on an 80 GB card.
CHECKPOINTING = ("none", "full", "selective")


def checkpointing_policy(value) -> str:
    """model.grad_checkpointing as a policy name: older configs' booleans read as full (true) and none (false)."""
    return {True: "full", False: "none"}[value] if isinstance(value, bool) else value


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one model size: the keys of the `model` config group."""

    name: str
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    grad_checkpointing: str = "none"  # none | full (every block) | selective (every other block)
    rope_theta: float = 10000.0
    freq_dim: int = 256  # sinusoid channels of the time embedding

    @classmethod
    def from_cfg(cls, model_cfg) -> "DiTConfig":
        """Validated config from a dict or DictConfig; unknown or missing keys fail with the list of keys."""
        cfg = dict(model_cfg.items())
        known = {f.name for f in fields(cls)}
        if unknown := set(cfg) - known:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}")
        try:
            ckpt = checkpointing_policy(cfg.get("grad_checkpointing", "none"))
            c = cls(**{**cfg, "patch_size": tuple(cfg.get("patch_size", cls.patch_size)), "grad_checkpointing": ckpt})
        except TypeError as e:
            raise ValueError(f"bad model config {cfg}: {e}") from None
        if c.grad_checkpointing not in CHECKPOINTING:
            raise ValueError(f"model.grad_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"got {c.grad_checkpointing!r}")
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        if c.head_dim % 2 or len(c.patch_size) != 3 or min(c.patch_size) < 1:
            raise ValueError(f"need an even head dim and a 3D patch size, got {c.head_dim} and {c.patch_size}")
        return c

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


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
        attention_class(attn_cfg)  # fails early, listing the choices, on an unknown name
        dense_layers = sorted(attn_cfg.get("dense_layers") or [])
        if any(not 0 <= i < cfg.depth for i in dense_layers):
            raise ValueError(f"attn.dense_layers {dense_layers} must be block indices in [0, {cfg.depth})")
        sparse_layers = [i for i in range(cfg.depth) if i not in dense_layers]
        # The whole network keeps the token order of its (non-dense) attention cores; dense ones take any order.
        self.order_layer = sparse_layers[0] if sparse_layers else 0
        self.patch_embed = PatchEmbed(in_channels, d, cfg.patch_size)
        self.time_embed = TimestepEmbedder(d, cfg.freq_dim)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # shared by all blocks
        self.text_embed = TextProjection(text_dim, d)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, {"name": "dense"} if i in dense_layers else attn_cfg) for i in range(cfg.depth)
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
        """Token grid, order and RoPE angles shared by all layers of one forward."""
        positions = grid_positions(grid, device)  # [S, 3] raster order
        order = self.blocks[self.order_layer].attn.core.token_order(grid, device)
        if order is not None:
            positions = positions[order]  # positions follow the tokens
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)  # [S, D/2] each
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
