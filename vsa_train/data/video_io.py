"""Video files in and out: decoding with decord (PyAV where decord is missing or fails), frame windows, resizing
to a training shape, and writing mp4/gif."""
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .batching import BadInput
from .buckets import span


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
