"""The video DiT family and `build_model`, the one way the trainer constructs a model (model=wan: models/wan.py)."""
from .attention import ATTENTION, AttnContext, build_attention, vsa_config
from .dit import DiTConfig, VideoDiT
from .wan import WanConfig, is_wan


def model_config(model_cfg) -> DiTConfig | WanConfig:
    """The validated architecture of a `model` config: a DiTConfig, or a WanConfig for model=wan (both give
    hidden_size, depth, num_heads, head_dim, mlp_hidden, freq_dim, patch_size)."""
    return WanConfig.from_cfg(model_cfg) if is_wan(model_cfg) else DiTConfig.from_cfg(model_cfg)


def build_model(model_cfg, attn_cfg, *, in_channels: int, text_dim: int, load_weights: bool = True):
    """A VideoDiT (or a wrapped diffusers Wan) from the `model` and `attn` config groups (dicts or DictConfigs;
    works on the meta device). load_weights=false skips a Wan folder's weights (a checkpoint replaces them)."""
    if is_wan(model_cfg):
        from .wan import build_wan

        return build_wan(WanConfig.from_cfg(model_cfg), attn_cfg, in_channels=in_channels, text_dim=text_dim,
                         load_weights=load_weights)
    return VideoDiT(DiTConfig.from_cfg(model_cfg), attn_cfg, in_channels=in_channels, text_dim=text_dim)


__all__ = ["ATTENTION", "AttnContext", "DiTConfig", "VideoDiT", "WanConfig", "build_attention", "build_model",
           "is_wan", "model_config", "vsa_config"]
