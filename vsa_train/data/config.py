"""The `data` section, one dataclass per `data.source`, each rule next to its field (configs/data/*.yaml document
the keys). Sources read their section by key (`cfg.frames`, `cfg.get("fps")`), so they take these dataclasses and
the DictConfig sections of tests and scripts alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingInput
from ..fields import ConfigError, Section, choice, flag, integer, is_int, is_num, number, positive, setting, text
from .buckets import ALLOWED as BUCKETS_ALLOWED, bucket_problems, bucket_shapes


VIDEO_BACKENDS = ("auto", "decord", "pyav")  # vsa_train/data/video_io.py, open_video
MAX_CAPTION_BYTES = 16 * 2**20  # the largest data.max_caption_bytes allowed


class DataSection(Section):
    def get(self, key: str, default=None):
        """The value of `key`, or `default` for a key this source does not have (as a mapping's `get`)."""
        return getattr(self, key, default)


def _probability(default):
    return number(default, lambda v: 0 <= v < 1, "a probability in [0, 1)")


def _seed(default=0):
    return setting(default, ok=is_int, allowed="an integer")


def _buckets_ok(value) -> bool:
    bucket_shapes(value)  # ValueError: not allowed
    return True


def _buckets():
    """data.buckets, held as its shapes (a rule generates them); null: none (data=latents: the index's)."""
    return setting(None, ok=_buckets_ok, allowed=BUCKETS_ALLOWED, optional=True, convert=bucket_shapes)


def _bucket_weights():
    return setting(None, ok=lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                   and all(is_num(x) and x >= 0 for x in v) and any(x > 0 for x in v),
                   allowed="a list of numbers >= 0, one per bucket, not all 0", optional=True, convert=tuple)


@dataclass(frozen=True)
class SyntheticConfig(DataSection):
    """data=synthetic: procedurally rendered videos with captions (vsa_train/data/synthetic.py)."""

    name: str = text()
    source: str = text("synthetic")
    frames: int = integer(8)
    height: int = integer(16)
    width: int = integer(16)
    max_shapes: int = integer(2)
    seed: int = _seed()
    text_len: int = integer(32)
    text_dim: int = integer(64)
    num_workers: int = integer(0, low=0)


@dataclass(frozen=True)
class VideosConfig(DataSection):
    """data=videos: video files listed in a manifest or found under a folder (vsa_train/data/listing.py, videos.py)."""

    name: str = text()
    source: str = text("videos")
    manifest: str | None = text(None, optional=True)
    folder: str | None = text(None, optional=True)
    frames: int = integer(8)
    height: int = integer(32)
    width: int = integer(32)
    stride: int = integer(2)
    fps: float | None = positive(None, optional=True)
    # Shape buckets (data/buckets.py): null trains every clip at (frames, height, width) as before
    buckets: tuple | None = _buckets()
    bucket_weights: tuple | None = _bucket_weights()
    max_upscale: float = number(1.0, lambda v: v >= 1, "a number >= 1")
    backend: str = choice("auto", VIDEO_BACKENDS)
    max_caption_bytes: int = setting(131072, ok=lambda v: is_int(v) and 1 <= v <= MAX_CAPTION_BYTES,
                                     allowed="an integer in [1, 16 MiB]")
    allow_outside_root: bool = flag(False)
    holdout: int = integer(0, low=0)
    caption_dropout: float = _probability(0.1)
    seed: int = _seed()
    text_len: int = integer(32)
    text_dim: int = integer(64)
    text_encoder: str | None = text(None, optional=True)
    text_encoder_subfolder: str | None = text(None, optional=True)
    tokenizer_subfolder: str | None = text(None, optional=True)
    text_encoder_revision: str | None = text(None, optional=True)
    text_encoder_dtype: str = text("bf16")  # its choices: data/encoders.py (ModelSpec), which also reads aliases
    num_workers: int = integer(2, low=0)

    def validate(self) -> list[str]:
        if self.manifest is not None and self.folder is not None:
            return [f"data.manifest={self.manifest!r} and data.folder={self.folder!r}: set only one of them"]
        return (bucket_problems(self.buckets, self.bucket_weights) + missing_input("manifest", self.manifest)
                + missing_input("folder", self.folder))


@dataclass(frozen=True, kw_only=True)
class HFConfig(VideosConfig):
    """data=hf: a table of video paths and captions (vsa_train/data/hf.py), decoded as data=videos does."""

    source: str = text("hf")
    path: str = text()                 # a local file or folder if one is there, else a Hub id org/name (hub.py)
    revision: str | None = text(None, optional=True)
    subset: str | None = text(None, optional=True)
    split: str = text("train")
    video_column: str = text("video")
    caption_column: str = text("caption")
    streaming: bool = flag(False)
    shuffle_buffer: int = integer(0, low=0)

    def validate(self) -> list[str]:
        return super().validate() + self._path_problems() + self._streaming_problems()

    def _path_problems(self) -> list[str]:
        """A local data.path must exist and takes no revision or subset; a Hub id must resolve (hub.py: an unknown
        id or revision, a loading script, an unreachable Hub with nothing cached), checked before any run
        directory is made."""
        from .hub import is_hub_id, resolve

        if not is_hub_id(self.path):
            hub_only = [f"data.{key}={value!r} is for a Hub dataset id; data.path={self.path!r} is local"
                        for key, value in (("revision", self.revision), ("subset", self.subset)) if value is not None]
            return missing_input("path", self.path) + hub_only
        try:
            resolve(self.path, self.revision)
        except MissingInput as e:
            return [str(e)]
        return []

    def _streaming_problems(self) -> list[str]:
        if self.buckets is not None and self.streaming:
            return ["data.buckets is not supported with data.streaming=true (each clip's shape is probed up front)"]
        if self.shuffle_buffer and not self.streaming:
            return [f"data.shuffle_buffer={self.shuffle_buffer} is for data.streaming=true (the rows in memory are "
                    "reshuffled every epoch)"]
        return []


@dataclass(frozen=True, kw_only=True)
class LatentsConfig(DataSection):
    """data=latents: VAE latents and text embeddings encoded once (vsa_train/data/latents.py)."""

    name: str = text()
    source: str = text("latents")
    path: str = text()
    # the index's buckets (data/latents.py checks these against it, with the index)
    buckets: tuple | None = _buckets()
    bucket_weights: tuple | None = _bucket_weights()
    holdout: int = integer(0, low=0)
    caption_dropout: float = _probability(0.1)
    seed: int = _seed()
    num_workers: int = integer(0, low=0)


def missing_input(key: str, value: str | None) -> list[str]:
    """The line for an input path the section names that is not there (checked with the config, before any run
    directory is made; the sources raise errors.MissingInput for what they find only when reading it)."""
    if value is None or (Path(value).is_dir() if key == "folder" else Path(value).exists()):
        return []
    return [f"data.{key}={value!r} {'is not a directory' if key == 'folder' else 'does not exist'}"]


SECTIONS = {"hf": HFConfig, "latents": LatentsConfig, "synthetic": SyntheticConfig, "videos": VideosConfig}


def data_section(source) -> type[DataSection]:
    """The config class of `data.source`; ConfigError listing the sources."""
    if source not in SECTIONS:
        raise ConfigError([f"data.source must be one of {', '.join(SECTIONS)}, got {source!r}"])
    return SECTIONS[source]
