"""Data sources, chosen by `data.source`: `build_data` returns the train stream, the fixed eval set and the spec.

A source is a module with `build(cfg, *, batch_size, eval_samples, rank, world_size, start_batch, report)` ->
(train loader, eval batch dict). Batches are dict(video [B, C, T, H, W] float32 (pixels in [-1, 1], or
normalised VAE latents), text [B, L, text_dim] float32, text_mask [B, L] bool, caption list[str], position
[B] int64 (each sample's index in the global training stream: batch b of rank r holds (b * world + r) * B + j;
the trainer draws each sample's noise from it), and optionally skipped list[str]: the bad inputs met while
assembling the batch, "name: reason").
With `data.buckets` (data/buckets.py; data=videos and data=hf, and data=latents encoded with buckets, whose index
sets them) each batch also holds `bucket`: the index of its
shape in `DataSpec.buckets` (video is [B, C, T, H, W] at that shape, the same on every rank for the whole step),
the source's build takes `grad_accum` (one bucket per optimizer step), and the eval set is a list of one-bucket
batches (one per bucket holding eval clips, in bucket order, each `eval_samples` videos and its `bucket`)
instead of one batch dict.
`data_commit(cfg)` is the commit a Hub dataset id resolved to (data=hf), which checkpoints record.
A source may also define `spec(cfg) -> DataSpec` (default: 3 pixel channels at the configured size),
`text_encoder(cfg)` (what turns prompts into `text`) and `decode(cfg, x) -> pixels` (latents only).
Pixel data with `data.text_encoder` set encodes captions with that pretrained encoder (encoders.py).
"""
from dataclasses import dataclass

from torch.utils.data import DataLoader

from . import hf, latents, listing, synthetic, videos
from .buckets import bucket_shapes
from .config import DataSection, data_section
from .encoders import pixel_text_encoder
from .spec import DataSpec
from .text import CaptionEncoder

SOURCES = {"synthetic": synthetic, "videos": videos, "hf": hf, "latents": latents}


@dataclass
class Data:
    """A built data source: the (infinite) train loader, the fixed eval batch, the spec and the dataset's commit."""

    train: DataLoader
    eval: dict
    spec: DataSpec
    commit: str | None = None  # `data_commit`: a resume must read the same one


def data_spec(cfg) -> DataSpec:
    """The spec from the config alone (no decoding; latents read their index file), e.g. for dry runs."""
    source = _source(cfg)
    if hasattr(source, "spec"):
        return source.spec(cfg)
    shapes = dict(video_shape=(cfg.frames, cfg.height, cfg.width), buckets=bucket_shapes(cfg.get("buckets")) or ())
    if cfg.get("text_encoder"):  # pixel data through a pretrained encoder: its width and length (encoders.py)
        enc = pixel_text_encoder(cfg, listing.text_cache_root(cfg))
        return DataSpec(in_channels=3, text_dim=enc.dim, text_len=enc.max_len, **shapes)
    return DataSpec(in_channels=3, text_dim=cfg.text_dim, text_len=cfg.text_len, **shapes)


def build_data(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1,
               start_batch: int = 0, report=None, grad_accum: int = 1) -> Data:
    """Builds data source `cfg.source` for one rank; `start_batch` skips batches already trained on (resume);
    `report(done, total)` hears the eval set's items as they are loaded; `grad_accum` micro-batches make a step
    (bucketed data draws one bucket per step)."""
    spec = data_spec(cfg)
    bucketed = {"grad_accum": grad_accum} if spec.buckets else {}  # sources without buckets do not take it
    train, eval_set = _source(cfg).build(cfg, batch_size=batch_size, eval_samples=eval_samples, rank=rank,
                                         world_size=world_size, start_batch=start_batch, report=report, **bucketed)
    return Data(train=train, eval=eval_set, spec=spec, commit=data_commit(cfg))


def data_commit(cfg) -> str | None:
    """The commit data=hf's Hub dataset id resolved to (once per process, with the config check); None for data
    that names no commit (local files, other sources)."""
    hub = hf.hub_dataset(cfg) if cfg.get("source") == "hf" else None
    return hub.commit if hub is not None else None


def build_text_encoder(cfg):
    """The text encoder the source trains with (`encode(captions) -> (emb, mask)`), for sampling from prompts."""
    source = _source(cfg)
    if cfg.get("text_encoder") and not hasattr(source, "spec"):  # pixel data: one cached instance per process
        return pixel_text_encoder(cfg, listing.text_cache_root(cfg))
    if hasattr(source, "text_encoder"):
        return source.text_encoder(cfg)
    return CaptionEncoder(source.VOCAB, dim=cfg.text_dim, max_len=cfg.text_len, seed=cfg.seed)


def decode(cfg, x):
    """Model-space videos [B, C, T, H, W] -> pixels [B, 3, T', H', W'] in [-1, 1] (the VAE for latents)."""
    source = _source(cfg)
    return source.decode(cfg, x) if hasattr(source, "decode") else x.clamp(-1, 1)


def _source(cfg):
    data_section(cfg.get("source"))  # ConfigError naming the sources for an unknown one
    return SOURCES[cfg.source]
