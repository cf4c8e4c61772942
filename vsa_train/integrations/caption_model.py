"""CaptionTextEncoder: the built-in caption encoder as a diffusers component, the text encoder of an export.

An export carries this file and the modules it needs (vsa_train/integrations/remote_code.py).
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from ..data.text import CaptionEncoder
from ..models.auto_map import AutoMapped


class CaptionTextEncoder(AutoMapped, ModelMixin, ConfigMixin):
    """The caption encoder rebuilt from (vocab, dim, max_len, seed); its table and positions are buffers, so the
    saved safetensors hold them too."""

    @register_to_config
    def __init__(self, vocab: list[str], dim: int = 64, max_len: int = 24, seed: int = 0):
        super().__init__()
        enc = CaptionEncoder(list(vocab), dim=dim, max_len=max_len, seed=seed)
        self.register_buffer("table", enc.table.clone())  # [V + 1, dim], row 0 <unk>
        self.register_buffer("positions", enc.positions.clone())  # [max_len, dim]
        self._encoder = enc

    @classmethod
    def from_encoder(cls, enc: CaptionEncoder, seed: int) -> CaptionTextEncoder:
        vocab = sorted(enc.index, key=enc.index.get)
        return cls(vocab=vocab, dim=enc.dim, max_len=enc.max_len, seed=seed)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (emb [B, max_len, dim] float32, mask [B, max_len] bool), as CaptionEncoder.encode."""
        enc = self._encoder
        enc.table, enc.positions = self.table.float().cpu(), self.positions.float().cpu()  # the loaded values
        return enc.encode(list(captions))

    def forward(self, captions: list[str]):
        return self.encode(captions)
