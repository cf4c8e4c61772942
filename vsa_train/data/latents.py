"""Precomputed latents: VAE latents and text embeddings in safetensors shards (scripts/encode_latents.py).

`data.path` holds `index.json` (shapes, dtypes, the VAE and text encoder used, the shards and their
counts, the inputs skipped while encoding) and `shard_<k>.safetensors` files with
latent [n, C, T, H, W] (normalised with the VAE's latents_mean / latents_std), text [n, L, D],
text_mask [n, L] and the captions in the metadata. The model's input channels and video shape are the
latent's, so patching follows the latent grid.
"""
import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .text import CaptionEncoder
from .videos import BadInput, ItemStream, eval_batch, holdout_split, make_loader

INDEX = "index.json"


# ------------------------------------------------------------------------------------------------------ VAE

def load_vae(path, device="cpu"):
    """A diffusers AutoencoderKLWan from a local directory, in eval mode."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(str(path)).to(device).eval()


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and std as [1, C, 1, 1, 1] tensors."""
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


@torch.no_grad()
def encode_videos(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, 1 + (F-1)/4, H/8, W/8] (posterior mode)."""
    raw = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
    mean, std = _stats(vae, raw)
    return ((raw - mean) / std).float()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, C, T, h, w] -> pixels [B, 3, F, H, W] in [-1, 1]."""
    z = latents.to(vae.device, vae.dtype)
    mean, std = _stats(vae, z)
    return vae.decode(z * std + mean).sample.float().clamp(-1, 1)


# -------------------------------------------------------------------------------------------- text encoders

class PretrainedTextEncoder:
    """A transformers encoder (T5/UMT5 encoder, BERT, ...) and its tokenizer from a local directory.

    Same interface as the built-in CaptionEncoder: `encode(captions) -> (emb [B, max_len, dim] float32,
    mask [B, max_len] bool)`, padded positions zeroed.
    """

    def __init__(self, path, max_len: int, device="cpu"):
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoTokenizer,
            T5EncoderModel,
            UMT5EncoderModel,
        )

        config = AutoConfig.from_pretrained(str(path))
        model_cls = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel}.get(config.model_type, AutoModel)
        self.model = model_cls.from_pretrained(str(path)).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.max_len, self.device = max_len, device
        self.dim = getattr(config, "d_model", None) or config.hidden_size

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_len,
                                return_tensors="pt").to(self.device)
        mask = tokens["attention_mask"].bool()
        emb = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return (emb.float() * mask[..., None]).cpu(), mask.cpu()


def encoder_from_index(index: dict, device="cpu"):
    """The text encoder an index was written with: built-in (vocabulary in the index) or a local directory."""
    L, D = index["text_shape"]
    if index["text_encoder"] == "builtin":
        return CaptionEncoder(index["vocab"], dim=D, max_len=L, seed=index["text_seed"])
    return PretrainedTextEncoder(index["text_encoder"], max_len=L, device=device)


# ---------------------------------------------------------------------------------------------------- shards

def write_shard(path, latent: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, captions: list[str],
                skipped: list[str]) -> None:
    """One shard, written to a temporary name and renamed, so that a file that exists is complete."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file({"latent": latent.contiguous(), "text": text.contiguous(), "text_mask": text_mask.contiguous()},
              str(tmp), metadata={"captions": json.dumps(captions), "skipped": json.dumps(skipped)})
    tmp.replace(path)


def shard_info(path) -> dict:
    """Count, shapes, dtypes and skipped inputs of a shard, from its header."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        latent, text = f.get_slice("latent"), f.get_slice("text")
        return {"file": Path(path).name, "count": latent.get_shape()[0], "latent_shape": latent.get_shape()[1:],
                "latent_dtype": latent.get_dtype(), "text_shape": text.get_shape()[1:],
                "text_dtype": text.get_dtype(), "skipped": json.loads(meta["skipped"])}


def read_index(root) -> dict:
    """The index of a latent directory, with a clear error when it is missing."""
    path = Path(root) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(root)!r} has no {INDEX}; write one with scripts/encode_latents.py")
    return json.loads(path.read_text())


class LatentStore:
    """Random access to the items of all shards (files opened lazily, once per process or worker)."""

    def __init__(self, root):
        self.root, self.index = Path(root), read_index(root)
        self.shards = [s for s in self.index["shards"] if s["count"] > 0]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.shards])
        self.latent_shape = list(self.index["latent_shape"])
        self._files = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def name(self, i: int) -> str:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return f"{self.shards[k]['file']}[{i - self.offsets[k]}]"

    def load(self, i: int, position: int | None = None) -> dict:
        """Item i as dict(video=latent, text, text_mask, caption); BadInput on wrong shapes or non-finite values.

        `position` (the stream position, as ItemStream passes it) is unused: a latent has no window to choose.
        """
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = int(i - self.offsets[k])
        if k not in self._files:
            self._files[k] = safe_open(str(self.root / self.shards[k]["file"]), framework="pt")
            self._files[k].__enter__()
        f = self._files[k]
        latent = f.get_slice("latent")[j: j + 1][0].float()
        if list(latent.shape) != self.latent_shape:
            raise BadInput(f"latent of shape {list(latent.shape)}, the index says {self.latent_shape}")
        if not torch.isfinite(latent).all():
            raise BadInput("non-finite latent")
        return {"video": latent, "text": f.get_slice("text")[j: j + 1][0].float(),
                "text_mask": f.get_slice("text_mask")[j: j + 1][0].bool(),
                "caption": json.loads(f.metadata()["captions"])[j]}

    def __getstate__(self):  # open file handles do not travel to DataLoader workers
        return dict(self.__dict__, _files={})


# ---------------------------------------------------------------------------------------------- data source

def spec(cfg):
    """Channels and (T, H, W) of the latents, text width and length of the stored embeddings."""
    from . import DataSpec  # the package imports this module first

    index = read_index(cfg.path)
    C, T, H, W = index["latent_shape"]
    L, D = index["text_shape"]
    return DataSpec(in_channels=C, text_dim=D, text_len=L, video_shape=(T, H, W))


def build(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
    """data=latents: train loader over the shards (the last `data.holdout` items held out) and the eval batch."""
    store = LatentStore(cfg.path)
    train, held = holdout_split(cfg, len(store))
    names = [store.name(i) for i in range(len(store))]
    stream = ItemStream(len(train), store.load, None, batch_size, cfg.seed, rank, world_size, start_batch, names)
    eval_set = eval_batch(held, store.load, None, eval_samples, names=names)
    return make_loader(stream, cfg.num_workers, cfg.seed), eval_set


def text_encoder(cfg):
    return encoder_from_index(read_index(cfg.path), device="cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=2)
def _cached_vae(path: str, device: str):
    return load_vae(path, device)


def decode(cfg, x: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels through the VAE recorded in the index."""
    vae = _cached_vae(str(read_index(cfg.path)["vae"]), str(x.device))
    return decode_latents(vae, x)
