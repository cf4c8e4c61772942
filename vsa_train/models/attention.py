"""Attention layers of the DiT and the one pluggable piece inside self-attention (dense or VSA).

Self-attention projects tokens to q, k, v [B, S, H, D], applies QK RMSNorm and 3D RoPE, and hands them to
its `core`, a module built from the `attn` config by `build_attention` (dense here, VSA in vsa.py). A core is called as
`core(q, k, v, x, ctx) -> out [B, S, H, D]`: `x` [B, S, d] is the block's (modulated) input, from which a
sparse core computes its per-token gates, and `ctx` (AttnContext) holds what all layers of one forward
share: the token grid after patchify and the order in which tokens are kept. `core(...)` is
`core.attend(q, k, v, *core.gates(x, H), ctx)`: the two halves are separate so that sequence parallelism
(vsa_train/parallel.py) can compute gates on its local tokens and attend over all tokens of some heads. A core also says,
through `token_order(grid, device)`, in which order it wants the tokens for the whole network (None: raster);
the model permutes once per forward, and RoPE positions follow the tokens.
"""
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..fields import ConfigError, Section, read_or_raise, text
from .rope import apply_rope
from .vsa import VSAAttention, VSAConfig

# On CUDA prefer cuDNN attention (fastest on H100), falling back in this order where it does not apply.
_CUDA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH
]
_SDPA_PRIORITY = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}


@dataclass
class AttnContext:
    """Per-forward state shared by every attention layer."""

    grid: tuple[int, int, int]  # (T', H', W') token grid after patchify
    positions: torch.Tensor  # [S, 3] (t, h, w) of each token, in the order the tokens are kept
    order: torch.Tensor | None  # [S] raster index of each kept token; None when tokens are in raster order
    cos: torch.Tensor  # [S, head_dim/2] RoPE angles of each kept token
    sin: torch.Tensor


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (in the input's dtype; CUDA autocast runs rms_norm in fp32 and returns fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


class DenseAttention(nn.Module):
    """Full softmax attention over all tokens via torch SDPA (cuDNN first on CUDA)."""

    def __init__(self, attn_cfg, dim: int, num_heads: int):
        super().__init__()

    @staticmethod
    def token_order(grid: tuple[int, int, int], device=None) -> torch.Tensor | None:
        """Dense attention is order-agnostic: keep raster order."""
        return None

    def forward(self, q, k, v, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return self.attend(q, k, v, None, None, ctx)  # [B, S, H, D]

    def gates(self, x: torch.Tensor, num_heads: int):
        """Dense attention has no gates."""
        return None, None

    def attend(self, q, k, v, gc, gf, ctx: AttnContext) -> torch.Tensor:
        """Softmax attention over all tokens of the heads given: [B, S, H, D] -> [B, S, H, D]."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if q.is_cuda:
            with sdpa_kernel(_CUDA_BACKENDS, **_SDPA_PRIORITY):
                out = F.scaled_dot_product_attention(q, k, v)  # [B, H, S, D]
        else:  # CPU: leave the choice to torch (and to any sdpa_kernel context of the caller)
            out = F.scaled_dot_product_attention(q, k, v)  # [B, H, S, D]
        return out.transpose(1, 2)  # [B, S, H, D]


# One VSA core serves all sparse variants; the config (configs/attn/<name>.yaml) picks the selection rule.
ATTENTION = {"dense": DenseAttention, "vsa": VSAAttention, "vsa_fine_only": VSAAttention,
             "vsa_coarse_only": VSAAttention, "tile_window": VSAAttention}


@dataclass(frozen=True)
class DenseConfig(Section):
    """The `attn` config of dense attention: its name only."""

    name: str = text()


def attn_section(name) -> type[DenseConfig] | type[VSAConfig]:
    """The config class of attention `name` (configs/attn/<name>.yaml); ConfigError listing the choices."""
    if name not in ATTENTION:
        raise ConfigError([f"attn.name must be one of {', '.join(ATTENTION)}, got {name!r}"])
    return DenseConfig if ATTENTION[name] is DenseAttention else VSAConfig


def attn_config(attn_cfg) -> DenseConfig | VSAConfig:
    """The typed `attn` section from a dict or DictConfig (or itself); ConfigError listing every problem."""
    if isinstance(attn_cfg, (DenseConfig, VSAConfig)):
        return attn_cfg
    return read_or_raise(attn_section(attn_cfg.get("name")), attn_cfg, "attn")


def vsa_config(attn_cfg) -> VSAConfig | None:
    """The VSA config of a sparse attention choice; None for dense attention."""
    cfg = attn_config(attn_cfg)
    return cfg if isinstance(cfg, VSAConfig) else None


def build_attention(attn_cfg, *, dim: int, num_heads: int) -> nn.Module:
    """One self-attention core for a layer of width dim with num_heads heads."""
    attn_cfg = attn_config(attn_cfg)
    return ATTENTION[attn_cfg.name](attn_cfg, dim, num_heads)


class SelfAttention(nn.Module):
    """Video self-attention: fused qkv, QK RMSNorm, 3D RoPE, a pluggable core, output projection."""

    def __init__(self, dim: int, num_heads: int, attn_cfg, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.core = build_attention(attn_cfg, dim=dim, num_heads=num_heads)
        self.proj = nn.Linear(dim, dim)
        self.sequence_parallel = None  # set by vsa_train/parallel.py: runs the core over all tokens of some heads

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).unbind(2)  # [B, S, H, D] each
        q = apply_rope(self.q_norm(q), ctx.cos, ctx.sin)  # [B, S, H, D]
        k = apply_rope(self.k_norm(k), ctx.cos, ctx.sin)  # [B, S, H, D]
        if self.sequence_parallel is None:
            out = self.core(q, k, v, x, ctx)  # [B, S, H, D]
        else:
            out = self.sequence_parallel(self.core, q, k, v, x, ctx)  # [B, S, H, D], S this rank's tokens
        return self.proj(out.reshape(B, S, -1))  # [B, S, d]


class CrossAttention(nn.Module):
    """Attention from video tokens to text tokens; padded text tokens (mask False) get no weight."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x.shape
        L = text.shape[1]
        q = self.q_norm(self.q(x).view(B, S, self.num_heads, self.head_dim))  # [B, S, H, D]
        k, v = self.kv(text).view(B, L, 2, self.num_heads, self.head_dim).unbind(2)  # [B, L, H, D] each
        k = self.k_norm(k)
        # Text is short (tens of tokens): explicit matmuls + softmax beat SDPA here, whose boolean-mask path
        # falls back to the memory-efficient kernel, whose backward is far slower.
        scores = torch.einsum("bshd,blhd->bhsl", q, k) * self.head_dim**-0.5  # [B, H, S, L]
        if text_mask is not None:
            # A caption with no valid token (e.g. the null caption of guidance) attends to nothing: let it
            # attend everywhere (no NaN from an all -inf softmax) and zero its result below.
            has_text = text_mask.any(dim=-1)  # [B]
            keep = (text_mask | ~has_text[:, None])[:, None, None, :]  # [B, 1, 1, L]
            scores = scores.masked_fill(~keep, float("-inf"))  # [B, H, S, L]
        probs = scores.float().softmax(dim=-1).to(v.dtype)  # [B, H, S, L]
        out = torch.einsum("bhsl,blhd->bshd", probs, v).reshape(B, S, -1)  # [B, S, d]
        if text_mask is not None:
            out = out * has_text[:, None, None].to(out.dtype)  # [B, S, d]
        return self.proj(out)  # [B, S, d]
