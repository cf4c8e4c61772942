"""data=videos: clips (vsa_train/data/listing.py) as training batches and the fixed eval set.

A clip becomes a fixed-size training video: `frames` frames `stride` apart (or at `fps`), resized so that
it covers `height` x `width`, center-cropped, scaled to [-1, 1] (vsa_train/data/video_io.py). Bad input (missing
or unreadable file, truncated or too-short clip, empty caption, a bad row) is skipped with a warning naming the
file and reported in the batch (`batch["skipped"]`) so the trainer can count it; it is never trained on.
"""
import logging
import re

import numpy as np
import torch

from .batching import BadInput, ItemStream, eval_batch, holdout_split, make_loader  # BadInput: re-exported
from .buckets import ClipShape, assign, build_buckets, bucket_shapes
from .listing import Clip, list_clips, source_name, text_cache_root
from .encoders import pixel_text_encoder
from .text import CaptionEncoder
from .video_io import frame_indices, open_video, resize_center_crop

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z]+")


def _video_source(clip: Clip):
    """What to open for a usable clip (a path or bytes); BadInput for a bad row or an empty caption."""
    if clip.error:
        raise BadInput(clip.error)
    if not clip.caption.strip():
        raise BadInput("empty caption")
    # A file of a Hub dataset's repo (hub.RepoFile) is downloaded only now: listing a dataset fetches no video.
    return clip.source.fetch() if hasattr(clip.source, "fetch") else clip.source


def load_clip(clip: Clip, cfg, start: float, shape=None) -> torch.Tensor:
    """A clip as a training video [3, T, H, W] in [-1, 1] (T, H, W: `shape`, default the data section's); raises
    BadInput on anything unusable."""
    frames, height, width = shape or (cfg.frames, cfg.height, cfg.width)
    source = _video_source(clip)
    try:
        reader = open_video(source, cfg.get("backend", "auto"))
        indices = frame_indices(len(reader), reader.fps, frames, cfg.get("stride", 1), cfg.get("fps"), start)
        video = resize_center_crop(reader.get(indices), height, width)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 -- decoders raise many types (DECORDError, av.error.*, RuntimeError) on bad files
        raise BadInput(f"unreadable ({type(e).__name__}: {str(e).strip()[:200]})") from None
    if not torch.isfinite(video).all():
        raise BadInput("non-finite pixels")
    return video


# ----------------------------------------------------------------------------------------------------- stream

def caption_encoder(cfg, clips: list[Clip]) -> CaptionEncoder:
    """The built-in caption encoder over the words of all captions (deterministic in the clip list and seed);
    with data.text_encoder set, that pretrained encoder, the clips' captions encoded once into a disk cache."""
    if cfg.get("text_encoder"):
        captions = [c.caption for c in clips if not c.error]
        return pixel_text_encoder(cfg, text_cache_root(cfg), captions=captions)
    vocab = sorted({w for clip in clips for w in _WORD.findall(clip.caption.lower())})
    return CaptionEncoder(vocab, dim=cfg.text_dim, max_len=cfg.text_len, seed=cfg.seed)


class ClipLoader:
    """load(i, position[, bucket]) for ItemStream / BucketStream / eval_batch: clip i as dict(video, caption), at
    bucket `bucket` of `shapes` (data.buckets) or the data section's shape.

    Training windows start at a pure function of (seed, stream position): the same clip gets a new window
    every epoch. Eval (position None) takes the middle window. A class, not a closure, so that DataLoader
    workers started by spawn (macOS, Windows) can pickle it.
    """

    def __init__(self, cfg, clips: list[Clip], shapes=None):
        self.cfg, self.clips, self.shapes = cfg, clips, shapes

    def __call__(self, i: int, position: int | None, bucket: int | None = None) -> dict:
        return load_item(self.clips[i], self.cfg, position, None if bucket is None else self.shapes[bucket])


def load_item(clip: Clip, cfg, position: int | None, shape=None) -> dict:
    """dict(video, caption) of a clip at stream `position` (its window's start: a pure function of the seed and
    the position), or its middle window for eval (position None); BadInput when unusable."""
    if position is None:
        start = 0.5
    else:
        start = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2, position))).random()
    return {"video": load_clip(clip, cfg, start, shape), "caption": clip.caption}


_PROBED: dict = {}  # files' ClipShape or BadInput: a rebuild (rollback, sampling) opens no file again


def probe(clip: Clip, cfg) -> ClipShape:
    """The frame count, rate and size of a clip (decodes at most its first frame); BadInput when unusable."""
    key = (clip.name, clip.source, clip.caption, cfg.get("backend", "auto")) if isinstance(clip.source, str) else None
    if key not in _PROBED:
        source = _video_source(clip)
        try:
            reader = open_video(source, cfg.get("backend", "auto"))
            found = ClipShape(len(reader), reader.fps, *reader.size())
        except BadInput as e:
            found = e
        except Exception as e:  # noqa: BLE001 -- decoders raise many types on bad files (as load_clip)
            found = BadInput(f"unreadable ({type(e).__name__}: {str(e).strip()[:200]})")
        if key is None:  # bytes or a repo file: not kept (their identity is not a stable key)
            if isinstance(found, BadInput):
                raise found
            return found
        _PROBED[key] = found
    if isinstance(_PROBED[key], BadInput):
        raise _PROBED[key]
    return _PROBED[key]


def bucket_of(clip: Clip, cfg, shapes) -> int:
    """The bucket clip goes to (buckets.assign); BadInput when it is unusable or fits none."""
    return assign(probe(clip, cfg), shapes, cfg.get("stride", 1), cfg.get("fps"), cfg.get("max_upscale", 1.0))


def build_from_clips(cfg, clips: list[Clip], *, batch_size: int, eval_samples: int, rank: int = 0,
                     world_size: int = 1, start_batch: int = 0, source: str = "the clip list", report=None,
                     grad_accum: int = 1):
    """Train loader and eval batch over a clip list (shared by data=videos and data=hf); `source` names it;
    `report` hears the eval set's progress (`eval_batch`). With data.buckets: `build_bucketed`."""
    if cfg.get("buckets") is not None:
        return build_bucketed(cfg, clips, batch_size=batch_size, eval_samples=eval_samples, rank=rank,
                              world_size=world_size, start_batch=start_batch, source=source, report=report,
                              grad_accum=grad_accum)
    train, held = holdout_split(cfg, len(clips))
    load, encoder, names = ClipLoader(cfg, clips), caption_encoder(cfg, clips), [c.name for c in clips]
    stream = ItemStream(len(train), load, encoder, batch_size, cfg.seed, rank, world_size, start_batch, names,
                        source)
    eval_set = eval_batch(held, load, encoder, eval_samples, names=names, source=source, report=report,
                          bad=stream.bad)
    return make_loader(stream, cfg.num_workers, cfg.seed), eval_set


def build_bucketed(cfg, clips: list[Clip], *, batch_size: int, eval_samples: int, rank: int = 0,
                   world_size: int = 1, start_batch: int = 0, source: str = "the clip list", report=None,
                   grad_accum: int = 1):
    """Train loader of one-bucket batches (buckets.BucketStream) and the eval set: a list of one-bucket batches,
    one per bucket that holds eval clips, in bucket order, each `eval_samples` videos with its `bucket` index."""
    shapes = bucket_shapes(cfg.buckets)
    train, held = holdout_split(cfg, len(clips))
    names, fits, unfit = [c.name for c in clips], {}, []
    for i in sorted(set(train) | set(held)):
        try:
            fits[i] = bucket_of(clips[i], cfg, shapes)
        except BadInput as e:
            unfit.append(f"{names[i]}: {e}")
    if unfit:
        log.warning("%s: %d of %d clips fit no bucket or are unusable; each is skipped, counted and named", source,
                    len(unfit), len(clips))
    return build_buckets(cfg, shapes, fits, train, held, ClipLoader(cfg, clips, shapes), caption_encoder(cfg, clips),
                         batch_size=batch_size, eval_samples=eval_samples, rank=rank, world_size=world_size,
                         start_batch=start_batch, grad_accum=grad_accum, names=names, source=source, report=report,
                         unfit=unfit)


def build(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1, start_batch: int = 0,
          report=None, grad_accum: int = 1):
    """data=videos: train loader (infinite, this rank's shard) and the fixed eval batch (a list of one-bucket
    batches with data.buckets); `grad_accum` micro-batches make a step (one bucket per step)."""
    return build_from_clips(cfg, list_clips(cfg), batch_size=batch_size, eval_samples=eval_samples, rank=rank,
                            world_size=world_size, start_batch=start_batch, source=source_name(cfg), report=report,
                            grad_accum=grad_accum)


def text_encoder(cfg) -> CaptionEncoder:
    """The caption encoder this source trains with (the sampler encodes prompts with it)."""
    return caption_encoder(cfg, list_clips(cfg))
