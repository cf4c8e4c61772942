"""VideoDiTTransformer: vsa_train's VideoDiT as a diffusers model, the transformer of an export.

An export carries this file and the modules it needs (vsa_train/integrations/remote_code.py), so it imports only
vsa_train modules that run without the package's other parts: the model, its attention and the op's PyTorch path.
"""
from __future__ import annotations

from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from ..models.dit import DiTConfig, VideoDiT
from ..ops.launch import HAVE_TRITON


class VideoDiTTransformer(VideoDiT, ModelMixin, ConfigMixin):
    """VideoDiT with its config in config.json: the same module tree and state-dict keys. forward(x [B, C, T, H, W],
    t [B] in [0, 1] (= the scheduler's sigma), text [B, L, text_dim], text_mask [B, L] bool) -> v [B, C, T, H, W]."""

    _no_split_modules = ["DiTBlock"]
    _supports_gradient_checkpointing = False  # VideoDiT has its own (model.grad_checkpointing in the config)

    @register_to_config
    def __init__(self, model: dict, attn: dict, in_channels: int, text_dim: int,
                 video_shape: tuple[int, int, int] | None = None, sparsity_limit: float = 1.0,
                 pixel_space: bool = True):
        if "backend" in attn and not HAVE_TRITON:  # VSA runs where the export is loaded: there, the PyTorch path
            attn = {**attn, "backend": "torch"}
        VideoDiT.__init__(self, DiTConfig.from_cfg(model), attn, in_channels=in_channels, text_dim=text_dim)
        self.set_sparsity_limit(sparsity_limit)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # auto_map names this file for diffusers' AutoModel: no argument (diffusers would warn that it ignores it)
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)
