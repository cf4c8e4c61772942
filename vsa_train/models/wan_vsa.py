"""Video Sparse Attention inside a diffusers `WanTransformer3DModel`: an attention processor for the self-attention
(`attn1`) of every block, its zero-initialised coarse gate, and the sparsity-schedule hook.

    from diffusers import WanTransformer3DModel
    from vsa_train.integrations.diffusers import apply_vsa, set_sparsity_limit, VSAWanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(...)      # or a config
    apply_vsa(model, sparsity=0.875, tile=(4, 4, 4))        # in place; returns the model
    set_sparsity_limit(model, 0.5)                          # a ramp's limit in force (1 = the target)
    model.save_pretrained(out)                              # config holds vsa_* (the limit too), weights the gates
    model = VSAWanTransformer3DModel.from_pretrained(out)   # gates and VSA settings back

`VSAWanAttnProcessor` follows diffusers' `WanAttnProcessor`: q/k/v projections, RMSNorm across heads, Wan's
interleaved RoPE, then instead of dense SDPA `vsa_train.ops.video_sparse_attention` on the tokens, which Wan keeps
in raster order of its (T', H', W') patch grid. The grid is read from `hidden_states` [B, C, T, H, W] by a forward
pre-hook on the transformer (and the config's patch size), stored in a state object that every processor of the
model shares. The coarse gate G_c is `attn.vsa_gate_coarse`, a Linear(dim, heads * head_dim) of the attention
input, zero-initialised (G_f = 1): with topk = all tiles the layer is exactly dense attention, so a pretrained model
starts as it was. The gate is a submodule of the attention module, so it trains, saves and loads with the model.

A plain `WanTransformer3DModel.from_pretrained` of such a folder runs dense attention without the gates; the config
key `vsa_attention` (DENSE_LOAD_NOTE) makes diffusers' one-line warning about the keys it ignores say so.

Not supported: attention masks in self-attention (Wan passes none), context parallelism (`_cp_plan`), and gradient
checkpointing recomputation across two different forwards (the grid is per forward, as the hook records it).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from .auto_map import AutoMapped
from .vsa import WAN_GATE, VSAConfig, backend_where_loaded
from ..ops import TileLayout, video_sparse_attention

try:  # private helper of diffusers (handles fused projections); the fallback covers versions without it
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections
except ImportError:  # pragma: no cover
    def _get_qkv_projections(attn, hidden_states, encoder_hidden_states):
        if getattr(attn, "fused_projections", False):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


# The value of config key vsa_attention: diffusers prints ignored config keys with their values in one warning line
DENSE_LOAD_NOTE = ("Video Sparse Attention with trained coarse gates (attn1.vsa_gate_coarse) in every block: a plain "
                   "WanTransformer3DModel drops both and runs dense attention; load VSAWanTransformer3DModel "
                   "(vsa_train), or the exported pipeline folder with trust_remote_code=True")


@dataclass
class VSAState:
    """What all VSA processors of one transformer share: the settings, the schedule's limit, this forward's grid."""

    cfg: VSAConfig
    limit: float = 1.0  # the sparsity limit in force (set_sparsity_limit); 1 = the configured target
    grid: tuple[int, int, int] | None = None  # (T', H', W') of the current forward

    def topk(self, grid) -> int:
        return self.cfg.topk_in_force(TileLayout(grid, self.cfg.tile).n_tiles, self.limit)


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE (interleaved pairs), as in diffusers' WanAttnProcessor: x [B, S, H, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class VSAWanAttnProcessor:
    """WanAttnProcessor for self-attention with `video_sparse_attention` in place of dense attention."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: VSAState):
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("VSAWanAttnProcessor is for self-attention (attn1) without a mask")
        grid = self.state.grid
        B, S, _ = hidden_states.shape
        if grid is None or grid[0] * grid[1] * grid[2] != S:
            raise ValueError(f"VSA needs the token grid of this forward (got {grid} for {S} tokens): call the "
                             "transformer itself (its forward pre-hook records the grid), not a block alone")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # [B, S, H*D] each
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        gate = getattr(attn, WAN_GATE)(hidden_states).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        # The op takes one dtype. Under CUDA autocast the RMSNorms return fp32 while v and the gate come out of bf16
        # linears: the autocast dtype then, as SDPA (dense Wan) would cast them; else the query's.
        device = query.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
        out = video_sparse_attention(query, key.to(dtype), value.to(dtype), grid, self.state.topk(grid),
                                     gate_coarse=gate.to(dtype), tile=self.state.cfg.tile,
                                     backend=self.state.cfg.backend)  # [B, S, H, D], raster order
        out = out.flatten(2, 3).type_as(query)  # [B, S, H*D]
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _record_grid(module, args, kwargs):
    """Forward pre-hook: the (T', H', W') token grid of `hidden_states` [B, C, T, H, W] for the processors."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    pt, ph, pw = module.config.patch_size
    module._vsa_state.grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)


def _install(transformer, cfg: VSAConfig) -> None:
    """Gates, processors and the grid hook on every block's attn1 (gates created only where missing)."""
    state = VSAState(cfg)
    if getattr(transformer, "_vsa_hook", None) is not None:
        transformer._vsa_hook.remove()
    transformer._vsa_state = state
    transformer._vsa_hook = transformer.register_forward_pre_hook(_record_grid, with_kwargs=True)
    for block in transformer.blocks:
        attn = block.attn1
        if getattr(attn, WAN_GATE, None) is None:
            ref = attn.to_q if hasattr(attn, "to_q") else attn.to_qkv
            gate = nn.Linear(ref.in_features, attn.heads * (attn.inner_dim // attn.heads), bias=True,
                             device=ref.weight.device, dtype=ref.weight.dtype)
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            attn.add_module(WAN_GATE, gate)
        attn.set_processor(VSAWanAttnProcessor(state))


def _vsa_config(sparsity: float, topk: int | None, tile, backend: str) -> VSAConfig:
    return VSAConfig.from_cfg({"name": "vsa", "sparsity": float(sparsity), "topk": topk,
                               "tile": tuple(int(t) for t in tile), "backend": backend})


def apply_vsa(transformer, sparsity: float = 0.875, topk: int | None = None, tile=(4, 4, 4),
              backend: str = "auto"):
    """Turns the self-attention of every block of a `WanTransformer3DModel` into VSA, in place; returns it.

    topk (key tiles per query tile) overrides sparsity (topk = max(1, round((1 - sparsity) * tiles))). New coarse
    gates start at zero: with topk = all tiles (sparsity 0) the model computes what it did before. The settings are
    recorded in the model's config (vsa_sparsity, vsa_topk, vsa_tile, vsa_backend, vsa_limit) and a plain
    `WanTransformer3DModel` becomes a `VSAWanTransformer3DModel`, so save_pretrained/from_pretrained keep both.
    """
    cfg = _vsa_config(sparsity, topk, tile, backend)
    _install(transformer, cfg)
    transformer.register_to_config(vsa_sparsity=cfg.sparsity, vsa_topk=cfg.topk, vsa_tile=list(cfg.tile),
                                   vsa_backend=cfg.backend, vsa_limit=1.0, vsa_attention=DENSE_LOAD_NOTE)
    if type(transformer) is WanTransformer3DModel:
        transformer.__class__ = VSAWanTransformer3DModel  # same layout plus VSA: saves under the VSA class name
    return transformer


def set_sparsity_limit(transformer, limit: float) -> None:
    """The sparsity schedule's limit in force for every VSA layer (1 = the configured target), as
    `VideoDiT.set_sparsity_limit`; a ramp from dense uses `VSAConfig.sparsity_limit(step)`. Recorded in the config
    (vsa_limit), so that save_pretrained keeps it."""
    if getattr(transformer, "_vsa_state", None) is None:
        raise ValueError("this transformer has no VSA installed (apply_vsa)")
    transformer._vsa_state.limit = float(limit)
    transformer.register_to_config(vsa_limit=float(limit))


class VSAWanTransformer3DModel(AutoMapped, WanTransformer3DModel):
    """`WanTransformer3DModel` with VSA self-attention (its config adds vsa_sparsity, vsa_topk, vsa_tile,
    vsa_backend, vsa_limit: the schedule's limit in force, and vsa_attention: DENSE_LOAD_NOTE, whatever its value).
    Loads the folders that `save_pretrained` writes after `apply_vsa`, gates included; where Triton is missing (an
    export's own code: integrations/remote_code.py), VSA runs its PyTorch path."""

    def __init__(self, *args, vsa_sparsity: float = 0.875, vsa_topk: int | None = None, vsa_tile=(4, 4, 4),
                 vsa_backend: str = "auto", vsa_limit: float = 1.0, vsa_attention: str = DENSE_LOAD_NOTE, **kwargs):
        super().__init__(*args, **kwargs)
        _install(self, _vsa_config(vsa_sparsity, vsa_topk, vsa_tile, backend_where_loaded(vsa_backend)))
        self._vsa_state.limit = float(vsa_limit)

    def set_sparsity_limit(self, limit: float) -> None:
        set_sparsity_limit(self, limit)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' from_pretrained; a folder of a plain WanTransformer3DModel loads too (the VSA keywords,
        e.g. vsa_sparsity=0.5, as overrides): its missing gates start at zero instead of staying on `meta`."""
        model = super().from_pretrained(*args, **kwargs)
        for block in model.blocks:
            attn = block.attn1
            gate = getattr(attn, WAN_GATE)
            if gate.weight.is_meta or gate.bias.is_meta:
                ref = attn.to_q if hasattr(attn, "to_q") else attn.to_qkv
                new = nn.Linear(gate.in_features, gate.out_features, device=ref.weight.device, dtype=ref.weight.dtype)
                nn.init.zeros_(new.weight)
                nn.init.zeros_(new.bias)
                new.requires_grad_(gate.weight.requires_grad)
                attn.add_module(WAN_GATE, new)
        return model


def _with_wan_signature(init):
    """The Wan parameters plus the VSA keywords as the explicit signature (what ConfigMixin reads)."""
    wan = list(inspect.signature(WanTransformer3DModel.__init__).parameters.values())
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    init.__signature__ = inspect.Signature(wan + own)
    return register_to_config(init)


VSAWanTransformer3DModel.__init__ = _with_wan_signature(VSAWanTransformer3DModel.__init__)
