"""The video DiT family and `build_model`, the one way the trainer constructs a model (model=wan: models/wan.py)."""
from . import dit, wan
from .attention import ATTENTION, AttnContext, DenseConfig, attn_config, attn_section, build_attention, vsa_config
from .dit import DiTConfig, VideoDiT
from .vsa import VSAConfig
from .wan import WanConfig, is_wan
from ..fields import ConfigError


def model_section(model_cfg) -> type[DiTConfig] | type[WanConfig]:
    """The config class of a `model` config: WanConfig for model=wan, else DiTConfig."""
    return WanConfig if is_wan(model_cfg) else DiTConfig


def model_config(model_cfg) -> DiTConfig | WanConfig:
    """The typed `model` section from a dict or DictConfig (or itself): a DiTConfig, or a WanConfig for model=wan
    (both give hidden_size, depth, num_heads, head_dim, mlp_hidden, freq_dim, patch_size)."""
    return model_section(model_cfg).from_cfg(model_cfg)


def model_problems(model_cfg: DiTConfig | WanConfig, attn_cfg) -> list[str]:
    """Why the `attn` config cannot run in this model (the rules that join the two sections)."""
    return (wan if isinstance(model_cfg, WanConfig) else dit).attn_problems(model_cfg, attn_config(attn_cfg))


def build_model(model_cfg, attn_cfg, *, in_channels: int, text_dim: int, load_weights: bool = True):
    """A VideoDiT (or a wrapped diffusers Wan) from the `model` and `attn` config sections (typed, dicts or
    DictConfigs; works on the meta device). load_weights=false skips a Wan folder's weights (a checkpoint replaces
    them)."""
    model_cfg, attn_cfg = model_config(model_cfg), attn_config(attn_cfg)
    if bad := model_problems(model_cfg, attn_cfg):
        raise ConfigError(bad)
    if isinstance(model_cfg, WanConfig):
        return wan.build_wan(model_cfg, attn_cfg, in_channels=in_channels, text_dim=text_dim,
                             load_weights=load_weights)
    return VideoDiT(model_cfg, attn_cfg, in_channels=in_channels, text_dim=text_dim)


__all__ = ["ATTENTION", "AttnContext", "DenseConfig", "DiTConfig", "VSAConfig", "VideoDiT", "WanConfig",
           "attn_config", "attn_section", "build_attention", "build_model", "is_wan", "model_config",
           "model_problems", "model_section", "vsa_config"]
