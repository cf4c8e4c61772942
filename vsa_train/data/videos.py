"""Video files: clips from a manifest or a folder, decoded with decord (PyAV where decord is missing or fails).

A clip becomes a fixed-size training video: `frames` frames `stride` apart (or at `fps`), resized so that
it covers `height` x `width`, center-cropped, scaled to [-1, 1]. Bad input (missing or unreadable file,
truncated or too-short clip, empty caption) is skipped with a warning naming the file and reported in the
batch (`batch["skipped"]`) so the trainer can count it; it is never trained on.

Bad rows found while listing (a manifest line that is malformed JSON or nested too deeply to parse, not valid
UTF-8, has a path that is not a string or lies outside the manifest's folder, a caption over
`data.max_caption_bytes`; a CSV record with a quote left open, which is reported at its first line and
reading goes on at the next line, so the rows a stray quote would swallow are still read; the same for
sidecar captions and data=hf rows) do not abort the listing: each stays in the clip list as a Clip whose
`error` holds the reason and whose name is "<manifest> line <n>" (1-based, blank lines counted). Loading it
raises BadInput(error), so the stream skips, warns about and reports it exactly once, like a bad video,
and the trainer's `data/skipped` counts it. Listing fails only when no row is usable.
"""
import csv
import io
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MissingInput
from .batching import BadInput, ItemStream, eval_batch, holdout_split, make_loader  # BadInput: re-exported
from .buckets import ClipShape, assign, build_buckets, bucket_shapes, span
from .encoders import pixel_text_encoder
from .text import CaptionEncoder

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v")
_WORD = re.compile(r"[a-z]+")
_CSV_FIELD_LIMIT = (1 << 31) - 1  # read over-long captions whole (then skip them) instead of crashing mid-row


@dataclass(frozen=True)
class Clip:
    """One video: `source` is a path or the encoded bytes (Hugging Face datasets); `name` identifies it in logs.

    `error` marks a row found unusable while listing: loading the clip raises BadInput(error).
    """

    name: str
    source: str | bytes  # or a hub.RepoFile, fetched when loaded
    caption: str
    error: str | None = None

    @classmethod
    def bad(cls, name: str, reason: str) -> "Clip":
        """A listed row that cannot be used, kept so that the stream reports it when met."""
        return cls(name=name, source="", caption="", error=reason)


@dataclass(frozen=True)
class RowRules:
    """What a listed row must satisfy: a caption of at most `max_caption_bytes`, a file inside the root."""

    max_caption_bytes: int = 131072
    allow_outside_root: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> "RowRules":
        """The rules set by data.max_caption_bytes and data.allow_outside_root (their bounds: data/config.py)."""
        return cls(int(cfg.get("max_caption_bytes", cls.max_caption_bytes)),
                   bool(cfg.get("allow_outside_root", cls.allow_outside_root)))


# ------------------------------------------------------------------------------------------------ row checks

def _kind(value) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(
        type(value), f"a {type(value).__name__}")


def _is_utf8(text: str) -> bool:
    """False when text holds surrogates: bytes that were not UTF-8 (read with errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_caption(caption, rules: RowRules) -> str:
    """The stripped caption (missing -> ""); BadInput when it is not a string, not UTF-8 or too long."""
    if caption is None:
        return ""  # an empty caption is refused when the clip loads, as for any empty caption
    if not isinstance(caption, str):
        raise BadInput(f"caption is {_kind(caption)}, not a string")
    if not _is_utf8(caption):
        raise BadInput("caption is not valid UTF-8")
    caption = caption.strip()
    if len(caption.encode("utf-8")) > rules.max_caption_bytes:
        raise BadInput(f"caption longer than {rules.max_caption_bytes} bytes (data.max_caption_bytes)")
    return caption


def resolve_inside(file: Path, root: Path, rules: RowRules, where: str) -> Path:
    """`file` with `..` and symlinks resolved (what is opened is what was checked); BadInput when it lies
    outside `root`, unless data.allow_outside_root is set."""
    try:
        real, real_root = file.resolve(), root.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, NUL bytes
        raise BadInput(f"path cannot be resolved ({e})") from None
    if not rules.allow_outside_root and not real.is_relative_to(real_root):
        raise BadInput(f"outside {where} {real_root} ({real}); set data.allow_outside_root=true to allow")
    return real


def path_text(value) -> str:
    """A row's path as it is; BadInput when it is not a string, empty or not UTF-8."""
    if not isinstance(value, str):
        raise BadInput(f"path is {_kind(value)}, not a string")
    if not value.strip():
        raise BadInput("path is empty")
    if not _is_utf8(value):
        raise BadInput("path is not valid UTF-8")
    return value


def check_path(value, root: Path, rules: RowRules, where: str) -> tuple[Path, Path]:
    """(as written, resolved) file of a row, relative to `root`; BadInput when not a string, not UTF-8 or outside."""
    file = root / Path(path_text(value)).expanduser()  # an absolute path replaces root
    return file, resolve_inside(file, root, rules, where)


_COUNTED: set[str] = set()  # the sources whose bad rows this process has counted


def checked(clips: list[Clip], source) -> list[Clip]:
    """`clips` after one warning counting the bad rows; MissingInput naming `source` when no row is usable."""
    bad = [c for c in clips if c.error]
    if not clips:
        raise MissingInput(f"no clips in {source}")
    if len(bad) == len(clips):
        raise MissingInput(f"none of the {len(clips)} rows of {source} is usable, e.g. {bad[0].name}: {bad[0].error}")
    if bad and str(source) not in _COUNTED:  # once per source and process (training and sampling both list it)
        _COUNTED.add(str(source))
        log.warning("%s: %d of %d rows are unusable; each is skipped, and named when first met", source, len(bad),
                    len(clips))
    return clips


# ------------------------------------------------------------------------------------------------ listing clips

def _looks_like_row(line: str, header: list[str]) -> bool:
    """Whether a physical line read alone is a manifest row (the header's width, a video file in 'path')."""
    try:
        fields = next(csv.reader([line]), [])
    except csv.Error:
        return False
    return len(fields) == len(header) and Path(fields[header.index("path")].strip()).suffix.lower() in VIDEO_EXTENSIONS


def _csv_records(lines: list[str], start: int, header: list[str], rows: list) -> int:
    """Appends (line, fields by column or BadInput) for the records from line index `start` on, up to one that
    is malformed; returns the index to read on from (the line after that record's first, so a stray quote
    loses one row, not the rows its quoted field swallowed), or len(lines) at the end."""
    reader = csv.reader(itertools.islice(lines, start, None), strict=True)  # strict: a quote left open is an error
    while True:
        first = start + reader.line_num  # the record's first line (0-based)
        try:
            record = next(reader)
        except StopIteration:
            return len(lines)
        except csv.Error as e:
            rows.append((first + 1, BadInput(f"malformed CSV up to line {start + reader.line_num} ({e}; an "
                                             "unbalanced quote?)")))
            return first + 1
        last = start + reader.line_num  # a quoted field may hold line breaks, but not lines that are rows
        if any(_looks_like_row(line, header) for line in lines[first + 1: last]):
            rows.append((first + 1, BadInput(f"a quoted field runs over the rows up to line {last} (an "
                                             "unbalanced quote?)")))
            return first + 1
        if len(record) == len(header):
            rows.append((first + 1, dict(zip(header, record))))
        elif record:  # blank lines are no records
            rows.append((first + 1, BadInput(f"{len(record)} fields, the header has {len(header)} "
                                             "(quote fields that hold commas)")))


def _csv_rows(path: Path) -> list[tuple[int, dict | BadInput]]:
    """(first line of the record, its fields by column, or BadInput) for each non-blank CSV record."""
    # surrogateescape: a non-UTF-8 byte spoils only the field that holds it, flagged by check_caption/path
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        lines = f.readlines()  # with newline="": split at \n, \r\n and \r, as the csv module counts lines
    old = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        reader = csv.reader(lines)
        header = [h.strip() for h in next(reader, [])]
        if "path" not in header:
            raise ValueError(f"{path}: no 'path' column (columns: {sorted(header)})")
        rows, start = [], reader.line_num
        while start < len(lines):
            start = _csv_records(lines, start, header, rows)
        return rows
    finally:
        csv.field_size_limit(old)


def _jsonl_rows(path: Path) -> list[tuple[int, dict | BadInput]]:
    """(line, object or BadInput) for each non-blank line of a JSON-lines file."""
    rows = []
    for line, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8-sig", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            rows.append((line, BadInput(f"malformed JSON ({e.msg} at column {e.colno})")))
            continue
        except RecursionError:  # json recurses per nesting level; the stack unwinds cleanly, the row is bad
            rows.append((line, BadInput("malformed JSON (nested too deeply to parse)")))
            continue
        rows.append((line, row if isinstance(row, dict) else BadInput(f"the line is {_kind(row)}, not an object")))
    return rows


def _manifest_clip(name: str, row: dict | BadInput, folder: Path, rules: RowRules) -> Clip:
    """A manifest row as a Clip, or as a bad Clip holding the reason."""
    if isinstance(row, BadInput):  # unreadable as a row
        return Clip.bad(name, str(row))
    try:
        if "path" not in row:
            raise BadInput(f"no 'path' key (keys: {sorted(row)})")
        file, real = check_path(row["path"], folder, rules, "the manifest's folder")
        caption = check_caption(row.get("caption"), rules)
    except BadInput as e:
        return Clip.bad(name, str(e))
    return Clip(name=str(file), source=str(real), caption=caption)


def read_manifest(path, rules: RowRules = RowRules()) -> list[Clip]:
    """Clips of a CSV (columns path, caption) or JSON-lines manifest; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"data.manifest={str(path)!r} does not exist")
    if path.suffix == ".csv":
        rows = _csv_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    else:
        raise ValueError(f"data.manifest must be .csv or .jsonl (path, caption), got {str(path)!r}")
    return checked([_manifest_clip(f"{path} line {line}", row, path.parent, rules) for line, row in rows], path)


def _folder_caption(file: Path, folder: Path, rules: RowRules) -> str:
    """The sidecar `<name>.txt` caption of a video, else the words of its file name."""
    sidecar = file.with_suffix(".txt")
    if not sidecar.is_file():
        return re.sub(r"[_\-.]+", " ", file.stem).strip()
    try:
        text = resolve_inside(sidecar, folder, rules, "data.folder").read_bytes()
        return check_caption(text.decode("utf-8-sig", errors="surrogateescape"), rules)
    except BadInput as e:
        raise BadInput(f"{e} (in {sidecar.name})") from None
    except OSError as e:
        raise BadInput(f"{sidecar.name} unreadable ({e})") from None


def _folder_clip(file: Path, folder: Path, rules: RowRules) -> Clip:
    """A video under data.folder as a Clip, or as a bad Clip holding the reason."""
    if not _is_utf8(str(file)):  # the name would break logs and prints; show its bytes escaped
        return Clip.bad(os.fsencode(file).decode("utf-8", "backslashreplace"), "file name is not valid UTF-8")
    try:
        real = resolve_inside(file, folder, rules, "data.folder")  # a symlink may point out of the folder
        caption = _folder_caption(file, folder, rules)
    except BadInput as e:
        return Clip.bad(str(file), str(e))
    return Clip(name=str(file), source=str(real), caption=caption)


def find_clips(folder, rules: RowRules = RowRules()) -> list[Clip]:
    """Video files under `folder` (sorted); the caption is a sidecar `<name>.txt`, else the file name's words."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"data.folder={str(folder)!r} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    return checked([_folder_clip(file, folder, rules) for file in files], folder)


# data=videos with neither data.manifest nor data.folder: the clips data/README.md sets up, found from the project
# root (this file is vsa_train/data/videos.py), not from the current folder.
SAMPLE_MANIFEST = Path(__file__).resolve().parents[2] / "data" / "sample_clips.csv"


def text_cache_root(cfg) -> Path:
    """Where pixel data keeps its text cache: the manifest's folder, data.folder, or the dataset's folder."""
    if cfg.get("source") == "hf":
        from .hub import is_hub_id, text_cache

        path = Path(cfg.path)
        if is_hub_id(cfg.path):
            return text_cache(cfg.path)
        return path if path.is_dir() else path.parent
    if cfg.get("folder") is not None:
        return Path(cfg.folder)
    if cfg.get("manifest") is not None:
        return Path(cfg.manifest).resolve().parent
    return SAMPLE_MANIFEST.parent


def source_name(cfg) -> str:
    """The manifest or folder that data=videos reads, for messages."""
    return str(cfg.get("manifest") or cfg.get("folder") or SAMPLE_MANIFEST)


def list_clips(cfg) -> list[Clip]:
    """The clips named by `data.manifest` or found under `data.folder` (at most one of them: data/config.py;
    neither: the project's sample manifest, data/sample_clips.csv, wherever the command runs from)."""
    rules = RowRules.from_cfg(cfg)
    if cfg.get("folder") is not None:
        return find_clips(cfg.folder, rules)
    return read_manifest(cfg.manifest if cfg.get("manifest") is not None else SAMPLE_MANIFEST, rules)


# --------------------------------------------------------------------------------------------------- decoding

class _DecordReader:
    """Random access through decord (seeks by index)."""

    def __init__(self, source):
        import decord

        self.vr = decord.VideoReader(source if isinstance(source, str) else io.BytesIO(source), num_threads=1)
        self.fps = float(self.vr.get_avg_fps())

    def size(self) -> tuple[int, int]:
        """(height, width) of its frames (decodes the first)."""
        return tuple(self.vr[0].shape[:2])

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
            self._size = (stream.codec_context.height, stream.codec_context.width)
            self.count = stream.frames or sum(1 for _ in container.decode(video=0))  # some containers omit it

    def size(self) -> tuple[int, int]:
        """(height, width) of its frames."""
        return self._size

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
                    frames[i] = _rgb(frame)
                if i >= max(indices):
                    break
        if len(frames) < len(wanted):
            raise BadInput(f"decoded {decoded} frames, the container claims {self.count} (truncated?)")
        return np.stack([frames[i] for i in indices])  # [T, H, W, 3] uint8


def _rgb(frame) -> np.ndarray:
    """[H, W, 3] uint8 of a PyAV frame, scaled on this thread: PyAV 17+ hands FFmpeg's scaler slice threads
    (threads=0, automatic) that deadlocked a data worker in CI (the caller and both slice threads waiting); the
    loader's worker processes are the parallelism anyway. Older PyAV scales on one thread and has no such key."""
    try:
        return frame.to_ndarray(format="rgb24", threads=1)
    except TypeError:  # PyAV < 17
        return frame.to_ndarray(format="rgb24")


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
    need = span(frames, clip_fps, stride, fps)
    if num_frames < need:
        raise BadInput(f"too short: {num_frames} frames, need {need}")
    first = round(start * (num_frames - need))
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
