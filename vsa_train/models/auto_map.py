"""AutoMapped: a diffusers config class whose config.json names its shipped code (auto_map) without a warning.

An export names each component's code in its config.json (integrations/remote_code.py, `ship`), for diffusers'
AutoModel; the classes themselves (VideoDiTTransformer, CaptionTextEncoder, VSAWanTransformer3DModel) take no such
argument, and diffusers would warn on every load that it ignores the key.
"""
from __future__ import annotations


class AutoMapped:
    """Mixed in before diffusers' ConfigMixin: loading drops config key auto_map."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """ConfigMixin's, without auto_map."""
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)
