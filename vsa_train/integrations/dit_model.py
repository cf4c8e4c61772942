"""VideoDiTTransformer: vsa_train's VideoDiT as a diffusers model, the transformer of an export.

An export carries this file and the modules it needs (vsa_train/integrations/remote_code.py), so it imports only
vsa_train modules that run without the package's other parts: the model, its attention and the op's PyTorch path.
"""
from __future__ import annotations

from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from ..models.auto_map import AutoMapped
from ..models.dit import DiTConfig, VideoDiT
from ..models.vsa import backend_where_loaded


class VideoDiTTransformer(AutoMapped, VideoDiT, ModelMixin, ConfigMixin):
    """VideoDiT with its config in config.json: the same module tree and state-dict keys. forward(x [B, C, T, H, W],
    t [B] in [0, 1] (= the scheduler's sigma), text [B, L, text_dim], text_mask [B, L] bool) -> v [B, C, T, H, W]."""

    _no_split_modules = ["DiTBlock"]
    _supports_gradient_checkpointing = False  # VideoDiT has its own (model.grad_checkpointing in the config)

    @register_to_config
    def __init__(self, model: dict, attn: dict, in_channels: int, text_dim: int,
                 video_shape: tuple[int, int, int] | None = None, sparsity_limit: float = 1.0,
                 pixel_space: bool = True):
        if "backend" in attn:
            attn = {**attn, "backend": backend_where_loaded(attn["backend"])}
        VideoDiT.__init__(self, DiTConfig.from_cfg(model), attn, in_channels=in_channels, text_dim=text_dim)
        self.set_sparsity_limit(sparsity_limit)
