"""Built-in caption encoder: a fixed word vocabulary with seeded random embeddings plus sinusoidal positions.

It has no weights to train or download and is deterministic, so the synthetic data needs nothing else.
Precomputed text embeddings (a later data source) expose the same interface: `encode`, `dim`, `max_len`.
"""
import hashlib
import math
import re

import torch

_WORD = re.compile(r"[a-z]+")


class CaptionEncoder:
    """Maps captions to (emb [B, max_len, dim] float32, mask [B, max_len] bool); unknown words share one vector."""

    def __init__(self, vocab: list[str], dim: int = 64, max_len: int = 24, seed: int = 0):
        if dim % 2:
            raise ValueError(f"text_dim must be even (sinusoidal positions), got {dim}")
        self.dim, self.max_len = dim, max_len
        self.index = {w: i + 1 for i, w in enumerate(sorted(set(vocab)))}  # 0 is <unk>
        g = torch.Generator().manual_seed(seed)
        # unit-norm rows keep the conditioning at a fixed scale whatever the width
        table = torch.randn(self._rows(), dim, generator=g)
        self.table = table / table.norm(dim=1, keepdim=True)
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.positions = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1) * 0.1  # [L, dim]

    def _rows(self) -> int:
        """Rows of the embedding table: one per word and <unk>."""
        return len(self.index) + 1

    def tokenize(self, caption: str) -> list[int]:
        """Lower-cased words -> vocabulary ids (0 for unknown), truncated to max_len."""
        return [self.index.get(w, 0) for w in _WORD.findall(caption.lower())][: self.max_len]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (emb [B, L, dim], mask [B, L]); padded positions are zero and masked out."""
        ids = torch.zeros(len(captions), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_len, dtype=torch.bool)
        for b, caption in enumerate(captions):
            tokens = self.tokenize(caption)
            ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[b, : len(tokens)] = True
        emb = (self.table[ids] + self.positions) * mask[..., None]
        return emb, mask


class HashedCaptionEncoder(CaptionEncoder):
    """The built-in encoder without a vocabulary, for captions not known up front (a streamed dataset): a word's
    vector is row 1 + (a stable hash of the word mod `buckets`), the same in every process and run."""

    def __init__(self, dim: int = 64, max_len: int = 24, seed: int = 0, buckets: int = 4096):
        self.buckets = buckets
        super().__init__([], dim=dim, max_len=max_len, seed=seed)

    def _rows(self) -> int:
        return self.buckets + 1

    def tokenize(self, caption: str) -> list[int]:
        words = _WORD.findall(caption.lower())[: self.max_len]
        # blake2b, not hash(): Python salts str hashes per process
        return [1 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % self.buckets
                for w in words]
