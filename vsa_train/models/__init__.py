"""The video DiT family and `build_model`, the one way the trainer constructs a model."""
from .attention import ATTENTION, AttnContext, build_attention, vsa_config
from .dit import DiTConfig, VideoDiT


def build_model(model_cfg, attn_cfg, *, in_channels: int, text_dim: int) -> VideoDiT:
    """A VideoDiT from the `model` and `attn` config groups (dicts or DictConfigs; works on the meta device)."""
    return VideoDiT(DiTConfig.from_cfg(model_cfg), attn_cfg, in_channels=in_channels, text_dim=text_dim)


__all__ = ["ATTENTION", "AttnContext", "DiTConfig", "VideoDiT", "build_attention", "build_model", "vsa_config"]
