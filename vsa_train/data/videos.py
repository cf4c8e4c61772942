"""Video files: clips from a manifest or a folder, decoded with decord (PyAV where decord is missing or fails).

A clip becomes a fixed-size training video: `frames` frames `stride` apart (or at `fps`), resized so that
it covers `height` x `width`, center-cropped, scaled to [-1, 1]. Bad input (missing or unreadable file,
truncated or too-short clip, empty caption) is skipped with a warning naming the file and reported in the
batch (`batch["skipped"]`) so the trainer can count it; it is never trained on.
"""
import csv
import io
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .text import CaptionEncoder

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v")
BACKENDS = ("auto", "decord", "pyav")
_WORD = re.compile(r"[a-z]+")


class BadInput(Exception):
    """A clip that cannot be trained on (the message says why)."""


@dataclass(frozen=True)
class Clip:
    """One video: `source` is a path or the encoded bytes (Hugging Face datasets); `name` identifies it in logs."""

    name: str
    source: str | bytes
    caption: str


# ---------------------------------------------------------------------------------------------- listing clips

def read_manifest(path) -> list[Clip]:
    """Clips of a CSV (columns path, caption) or JSON-lines manifest; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.manifest={str(path)!r} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"data.manifest must be .csv or .jsonl (path, caption), got {str(path)!r}")
    clips = []
    for i, row in enumerate(rows):
        if "path" not in row:
            raise ValueError(f"{path}: row {i + 1} has no 'path' column (columns: {sorted(row)})")
        file = Path(row["path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        clips.append(Clip(name=str(file), source=str(file), caption=(row.get("caption") or "").strip()))
    return clips


def find_clips(folder) -> list[Clip]:
    """Video files under `folder` (sorted); the caption is a sidecar `<name>.txt`, else the file name's words."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.folder={str(folder)!r} is not a directory")
    clips = []
    for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS):
        sidecar = file.with_suffix(".txt")
        caption = sidecar.read_text().strip() if sidecar.is_file() else re.sub(r"[_\-.]+", " ", file.stem).strip()
        clips.append(Clip(name=str(file), source=str(file), caption=caption))
    return clips


def list_clips(cfg) -> list[Clip]:
    """The clips named by `data.manifest` or found under `data.folder` (exactly one of them)."""
    if (cfg.get("manifest") is None) == (cfg.get("folder") is None):
        raise ValueError("data=videos needs exactly one of data.manifest=FILE (.csv/.jsonl) or data.folder=DIR")
    clips = read_manifest(cfg.manifest) if cfg.get("manifest") is not None else find_clips(cfg.folder)
    if not clips:
        raise ValueError(f"no clips in {cfg.get('manifest') or cfg.get('folder')}")
    return clips


# --------------------------------------------------------------------------------------------------- decoding

class _DecordReader:
    """Random access through decord (seeks by index)."""

    def __init__(self, source):
        import decord

        self.vr = decord.VideoReader(source if isinstance(source, str) else io.BytesIO(source), num_threads=1)
        self.fps = float(self.vr.get_avg_fps())

    def __len__(self) -> int:
        return len(self.vr)

    def get(self, indices: list[int]) -> np.ndarray:
        return self.vr.get_batch(indices).asnumpy()  # [T, H, W, 3] uint8


class _PyAVReader:
    """Sequential decoding through PyAV (FFmpeg) up to the last requested frame; keeps only the requested ones.

    No seeking, so a window late in a long clip costs decoding everything before it: the fallback, not the
    fast path.
    """

    def __init__(self, source):
        import av

        self.source = source
        with av.open(self._file()) as container:
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate or stream.guessed_rate or 0)
            self.count = stream.frames or sum(1 for _ in container.decode(video=0))  # some containers omit it

    def _file(self):
        return self.source if isinstance(self.source, str) else io.BytesIO(self.source)

    def __len__(self) -> int:
        return self.count

    def get(self, indices: list[int]) -> np.ndarray:
        import av

        wanted, frames, decoded = set(indices), {}, 0
        with av.open(self._file()) as container:
            for i, frame in enumerate(container.decode(video=0)):
                decoded = i + 1
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= max(indices):
                    break
        if len(frames) < len(wanted):
            raise BadInput(f"decoded {decoded} frames, the container claims {self.count} (truncated?)")
        return np.stack([frames[i] for i in indices])  # [T, H, W, 3] uint8


def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def open_video(source, backend: str = "auto"):
    """A reader with `len()`, `.fps` and `.get(indices) -> uint8 [T, H, W, 3]`.

    backend "auto" uses decord when it is installed and falls back to PyAV when decord is missing or cannot
    open the file; "decord" and "pyav" force one.
    """
    if backend not in BACKENDS:
        raise ValueError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(source, str) and not Path(source).is_file():
        raise BadInput("file not found")
    if backend == "pyav" or (backend == "auto" and not _decord_available()):
        return _PyAVReader(source)
    try:
        return _DecordReader(source)
    except Exception:
        if backend == "decord":
            raise
        return _PyAVReader(source)  # decord lacks some codecs/containers that FFmpeg reads


def frame_indices(num_frames: int, clip_fps: float, frames: int, stride: int, fps: float | None,
                  start: float) -> list[int]:
    """`frames` indices `stride` apart (or spaced to sample at `fps`), from start in [0, 1] of the free range."""
    step = clip_fps / fps if fps else float(stride)
    span = math.floor((frames - 1) * step) + 1
    if num_frames < span:
        raise BadInput(f"too short: {num_frames} frames, need {span}")
    first = round(start * (num_frames - span))
    return [first + math.floor(k * step) for k in range(frames)]


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, height, width] in [-1, 1]: scale to cover, then center-crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)  # [T, 3, h', w']
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top: top + height, left: left + width]                                     # [T, 3, height, width]
    return (x / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()                   # [3, T, height, width]


def load_clip(clip: Clip, cfg, start: float) -> torch.Tensor:
    """A clip as a training video [3, T, H, W] in [-1, 1]; raises BadInput on anything unusable."""
    if not clip.caption.strip():
        raise BadInput("empty caption")
    try:
        reader = open_video(clip.source, cfg.get("backend", "auto"))
        indices = frame_indices(len(reader), reader.fps, cfg.frames, cfg.get("stride", 1), cfg.get("fps"), start)
        video = resize_center_crop(reader.get(indices), cfg.height, cfg.width)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 -- decoders raise many types (DECORDError, av.error.*, RuntimeError) on bad files
        raise BadInput(f"unreadable ({type(e).__name__}: {str(e).strip()[:200]})") from None
    if not torch.isfinite(video).all():
        raise BadInput("non-finite pixels")
    return video


# ----------------------------------------------------------------------------------------------------- stream

def caption_encoder(cfg, clips: list[Clip]) -> CaptionEncoder:
    """The built-in caption encoder over the words of all captions (deterministic in the clip list and seed)."""
    vocab = sorted({w for clip in clips for w in _WORD.findall(clip.caption.lower())})
    return CaptionEncoder(vocab, dim=cfg.text_dim, max_len=cfg.text_len, seed=cfg.seed)


class ItemStream(IterableDataset):
    """Infinite stream of batches over N items, reshuffled every epoch; bad items are skipped and reported.

    Batch b of rank r holds stream positions (b * world + r) * B + j. Position p is item perm_e[p mod N] of
    epoch e = p // N; an unusable item is replaced by the next position's, so a batch is a pure function of
    (seed, b, r) whatever the workers (exact resume; `start_batch` skips consumed batches). `load(i, p)`
    returns the item as dict(video, caption[, text, text_mask]) or raises BadInput; each bad item is warned about and reported once
    per worker.
    """

    def __init__(self, n: int, load, encoder, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, names=None):
        self.n, self.load, self.encoder, self.batch_size, self.seed = n, load, encoder, batch_size, seed
        self.rank, self.world_size, self.start_batch, self.names = rank, world_size, start_batch, names
        self._epoch, self._perm = None, None

    def _item(self, p: int) -> int:
        epoch = p // self.n
        if self._epoch != epoch:  # one permutation per epoch, not per item (N may be millions)
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch,)))
            self._epoch, self._perm = epoch, rng.permutation(self.n)
        return int(self._perm[p % self.n])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        bad: set[int] = set()
        for b in itertools.count(self.start_batch + worker, workers):
            first = (b * self.world_size + self.rank) * self.batch_size
            items, skipped = [], []
            for p in range(first, first + self.batch_size):
                for q in range(p, p + self.n + 1):
                    if q == p + self.n:
                        raise RuntimeError(f"none of the {self.n} inputs is usable; see the warnings above")
                    i = self._item(q)
                    if i in bad:
                        continue
                    try:
                        items.append(self.load(i, q))
                    except BadInput as e:
                        bad.add(i)
                        name = self.names[i] if self.names else str(i)
                        log.warning("skipping %s: %s", name, e)
                        skipped.append(f"{name}: {e}")
                        continue
                    break
            yield dict(collate(items, self.encoder), skipped=skipped)


def collate(items: list[dict], encoder) -> dict:
    """Items dict(video, caption[, text, text_mask]) -> a batch; text is encoded here unless precomputed."""
    captions = [item["caption"] for item in items]
    if "text" in items[0]:
        text = torch.stack([item["text"] for item in items])
        text_mask = torch.stack([item["text_mask"] for item in items])
    else:
        text, text_mask = encoder.encode(captions)
    return {"video": torch.stack([item["video"] for item in items]), "text": text, "text_mask": text_mask,
            "caption": captions}


def eval_batch(indices, load, encoder, eval_samples: int, names=None) -> dict:
    """The fixed eval set: the first `eval_samples` usable items of `indices` (cycled if fewer), bad ones skipped."""
    items = []
    for i in indices:
        if len(items) == eval_samples:
            break
        try:
            items.append(load(i, None))
        except BadInput as e:
            log.warning("skipping %s (eval set): %s", names[i] if names else i, e)
    if not items:
        raise RuntimeError("no usable input for the eval set; see the warnings above")
    return collate([items[k % len(items)] for k in range(eval_samples)], encoder)


def make_loader(stream: IterableDataset, num_workers: int, seed: int) -> DataLoader:
    """A DataLoader over a stream of ready batches (its own generator leaves the global RNG to the trainer)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(seed))


def holdout_split(cfg, n: int) -> tuple[range, range]:
    """(train, eval) item ranges: the last `data.holdout` items are eval-only; 0 evaluates on training items."""
    holdout = cfg.get("holdout", 0)
    if not 0 <= holdout < n:
        raise ValueError(f"data.holdout={holdout} must be in [0, {n}) for {n} items")
    if not holdout:
        log.warning("data.holdout=0: the eval loss is measured on training items (for videos, their middle "
                    "windows); set data.holdout=N to hold the last N out")
        return range(n), range(n)
    return range(n - holdout), range(n - holdout, n)


class ClipLoader:
    """load(i, position) for ItemStream / eval_batch: clip i as dict(video, caption).

    Training windows start at a pure function of (seed, stream position): the same clip gets a new window
    every epoch. Eval (position None) takes the middle window. A class, not a closure, so that DataLoader
    workers started by spawn (macOS, Windows) can pickle it.
    """

    def __init__(self, cfg, clips: list[Clip]):
        self.cfg, self.clips = cfg, clips

    def __call__(self, i: int, position: int | None) -> dict:
        if position is None:
            start = 0.5
        else:
            start = np.random.default_rng(np.random.SeedSequence(self.cfg.seed, spawn_key=(2, position))).random()
        return {"video": load_clip(self.clips[i], self.cfg, start), "caption": self.clips[i].caption}


def build_from_clips(cfg, clips: list[Clip], *, batch_size: int, eval_samples: int, rank: int = 0,
                     world_size: int = 1, start_batch: int = 0):
    """Train loader and eval batch over a clip list (shared by data=videos and data=hf)."""
    train, held = holdout_split(cfg, len(clips))
    load, encoder, names = ClipLoader(cfg, clips), caption_encoder(cfg, clips), [c.name for c in clips]
    stream = ItemStream(len(train), load, encoder, batch_size, cfg.seed, rank, world_size, start_batch, names)
    eval_set = eval_batch(held, load, encoder, eval_samples, names=names)
    return make_loader(stream, cfg.num_workers, cfg.seed), eval_set


def build(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
    """data=videos: train loader (infinite, this rank's shard) and the fixed eval batch."""
    return build_from_clips(cfg, list_clips(cfg), batch_size=batch_size, eval_samples=eval_samples, rank=rank,
                            world_size=world_size, start_batch=start_batch)


def text_encoder(cfg) -> CaptionEncoder:
    """The caption encoder this source trains with (the sampler encodes prompts with it)."""
    return caption_encoder(cfg, list_clips(cfg))


# ---------------------------------------------------------------------------------------------------- writing

def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_video(video: torch.Tensor, path, fps: float = 8.0) -> list[Path]:
    """Writes [3, T, H, W] in [-1, 1] as `path` (.mp4 via PyAV) and the same name with .gif (Pillow)."""
    import av
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video)                                          # [T, H, W, 3]
    # yuv420p needs even sides: pad by edge replication rather than resample
    h, w = frames.shape[1:3]
    even = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path.with_suffix(".mp4")), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = even.shape[2], even.shape[1], "yuv420p"
        for frame in even:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path.with_suffix(".gif"), save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0)
    return [path.with_suffix(".mp4"), path.with_suffix(".gif")]
