"""Synthetic videos: bouncing textured shapes on textured backgrounds, with captions that describe them.

Every video is a pure function of (data seed, split, index): the training stream and the held-out eval set
use different SeedSequence spawn keys, so they never share a video seed. Rendering is vectorised over the
batch, shapes, frames and pixels (one torch expression per step), so the CPU demo is not data-bound.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .text import CaptionEncoder

COLOURS = {
    "red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1),
    "cyan": (0.1, 0.85, 0.9), "magenta": (0.9, 0.15, 0.85), "white": (0.95, 0.95, 0.95), "orange": (1.0, 0.55, 0.05),
}
SHAPES = ("circle", "square", "triangle", "diamond")
TEXTURES = ("plain", "striped", "checkered")
BACKGROUNDS = ("plain", "striped", "checkered", "gradient")
MOTIONS = {  # unit direction in (x, y), y pointing down as in images
    "left to right": (1.0, 0.0), "right to left": (-1.0, 0.0), "upwards": (0.0, -1.0), "downwards": (0.0, 1.0),
    "diagonally down": (0.7071, 0.7071), "diagonally up": (0.7071, -0.7071),
}
SPEEDS = {"slowly": 0.6, "quickly": 1.6}  # image widths per clip
SPLITS = {"train": 0, "eval": 1}
VOCAB = sorted({w for name in [*COLOURS, *SHAPES, *TEXTURES, *BACKGROUNDS, *MOTIONS, *SPEEDS] for w in name.split()}
               | {"a", "and", "on", "background", "bouncing"})


@dataclass
class Scene:
    """Parameters of a batch of videos, K shape slots each (inactive slots are invisible)."""

    start: torch.Tensor       # [B, K, 2] centre at t=0, in [0, 1]^2
    velocity: torch.Tensor    # [B, K, 2] per clip length
    radius: torch.Tensor      # [B, K] fraction of the shorter side
    colour: torch.Tensor      # [B, K, 3]
    shape: torch.Tensor       # [B, K] index into SHAPES
    texture: torch.Tensor     # [B, K] index into TEXTURES
    active: torch.Tensor      # [B, K] bool
    bg_colour: torch.Tensor   # [B, 3]
    bg_pattern: torch.Tensor  # [B] index into BACKGROUNDS
    captions: list


def sample_scene(seed: int, split: str, indices: list[int], max_shapes: int) -> Scene:
    """Draws the parameters and captions of videos `indices` of `split` (deterministic in seed, split, index)."""
    rows, captions = [], []
    colour_names, motion_names, speed_names = list(COLOURS), list(MOTIONS), list(SPEEDS)
    for index in indices:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS[split], index)))
        n = int(rng.integers(1, max_shapes + 1))
        shapes, words = [], []
        for k in range(max_shapes):
            colour, motion, speed = rng.choice(colour_names), rng.choice(motion_names), rng.choice(speed_names)
            shape, texture = int(rng.integers(len(SHAPES))), int(rng.integers(len(TEXTURES)))
            radius = rng.uniform(0.12, 0.22)
            direction = np.array(MOTIONS[motion]) * SPEEDS[speed]
            shapes.append((rng.uniform(0, 1, 2), direction, radius, COLOURS[colour], shape, texture, k < n))
            if k < n:
                words.append(f"a {TEXTURES[texture]} {colour} {SHAPES[shape]} bouncing {motion} {speed}")
        bg_colour, bg_pattern = rng.choice(colour_names), int(rng.integers(len(BACKGROUNDS)))
        captions.append(" and ".join(words) + f" on a {BACKGROUNDS[bg_pattern]} {bg_colour} background")
        rows.append((shapes, COLOURS[bg_colour], bg_pattern))

    def field(i, dtype=torch.float32):
        return torch.tensor(np.array([[s[i] for s in shapes] for shapes, _, _ in rows]), dtype=dtype)

    return Scene(start=field(0), velocity=field(1), radius=field(2), colour=field(3), shape=field(4, torch.long),
                 texture=field(5, torch.long), active=field(6, torch.bool),
                 bg_colour=torch.tensor([r[1] for r in rows]), bg_pattern=torch.tensor([r[2] for r in rows]),
                 captions=captions)


def _bounce(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Folds an unbounded coordinate into [lo, hi] as a ball reflecting off both walls (triangle wave)."""
    span = hi - lo
    z = torch.remainder(u - lo, 2 * span)
    return lo + span - (z - span).abs()


def _pattern(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor, freq: float) -> torch.Tensor:
    """Texture value in [0.55, 1] for pattern ids kind (0 plain, 1 stripes, 2 checks, 3 gradient) at coords u, v."""
    stripes = torch.sin(2 * math.pi * freq * (u + v)) > 0
    checks = (torch.sin(2 * math.pi * freq * u) * torch.sin(2 * math.pi * freq * v)) > 0
    gradient = v.clamp(0, 1).expand_as(stripes)
    value = torch.where(kind == 1, stripes.float(), torch.where(kind == 2, checks.float(),
                        torch.where(kind == 3, gradient, torch.ones_like(gradient))))
    return 0.55 + 0.45 * value


def render(scene: Scene, frames: int, height: int, width: int) -> torch.Tensor:
    """Renders a scene to videos [B, 3, T, H, W] in [-1, 1]."""
    side = min(height, width)
    t = torch.linspace(0, 1, frames)[None, None, :, None, None]                # [1, 1, T, 1, 1]
    y = ((torch.arange(height) + 0.5) / side)[None, None, None, :, None]      # [1, 1, 1, H, 1]
    x = ((torch.arange(width) + 0.5) / side)[None, None, None, None, :]       # [1, 1, 1, 1, W]
    r = scene.radius[..., None, None, None]                                   # [B, K, 1, 1, 1]
    p0, vel = scene.start[..., None, None, None], scene.velocity[..., None, None, None]  # [B, K, 2, 1, 1, 1]
    # centres bounce inside the frame so shapes stay fully visible
    cx = _bounce(r + p0[:, :, 0] * (width / side - 2 * r) + vel[:, :, 0] * t, r, width / side - r)    # [B, K, T, 1, 1]
    cy = _bounce(r + p0[:, :, 1] * (height / side - 2 * r) + vel[:, :, 1] * t, r, height / side - r)  # [B, K, T, 1, 1]
    dx, dy = x - cx, y - cy                                                   # [B, K, T, 1|H, W|1]
    # distance-like measure that is 1 on each shape's outline
    dist = torch.stack([
        torch.sqrt(dx**2 + dy**2) / r,                                        # circle
        torch.maximum(dx.abs(), dy.abs()) / (0.85 * r),                       # square
        torch.maximum(dy, 0.866 * dx.abs() - 0.5 * dy) / (0.55 * r),          # triangle (apex up)
        (dx.abs() + dy.abs()) / (1.2 * r),                                    # diamond
    ])                                                                        # [4, B, K, T, H, W]
    dist = torch.gather(dist, 0, scene.shape[None, :, :, None, None, None].expand(1, *dist.shape[1:]))[0]
    alpha = ((1 - dist) * r * side + 0.5).clamp(0, 1)                         # [B, K, T, H, W], ~1 px anti-aliasing
    alpha = alpha * scene.active[..., None, None, None]
    # shape textures move with the shape (coordinates relative to its centre)
    tex = _pattern(scene.texture[..., None, None, None], dx / r, dy / r, 0.75)  # [B, K, T, H, W]
    bg_y = (y / (height / side)).expand(1, 1, 1, height, width)[:, 0]         # [1, 1, H, W]
    bg = _pattern(scene.bg_pattern[:, None, None, None], x[:, 0], bg_y, 3.0)  # [B, 1, H, W]
    video = 0.35 * scene.bg_colour[:, :, None, None, None] * bg[:, None]      # [B, 3, 1, H, W] (dim background)
    video = video.expand(-1, -1, frames, -1, -1)                              # [B, 3, T, H, W]
    for k in range(scene.active.shape[1]):  # painter's order: later shapes in front
        a = alpha[:, k, None]                                                 # [B, 1, T, H, W]
        paint = scene.colour[:, k, :, None, None, None] * tex[:, k, None]     # [B, 3, T, H, W]
        video = video * (1 - a) + paint * a
    return video * 2 - 1                                                      # [B, 3, T, H, W] in [-1, 1]


class SyntheticVideos(IterableDataset):
    """Infinite stream of ready batches: batch b of rank r holds videos (b * world + r) * B ... + B - 1.

    Yielding whole batches (DataLoader batch_size=None) makes the order independent of num_workers: worker w
    renders batches b = w, w + W, ... and the DataLoader returns them round-robin, i.e. in order.
    `start_batch` skips what a resumed run already consumed.
    """

    def __init__(self, cfg, encoder: CaptionEncoder, batch_size: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0):
        self.cfg, self.encoder, self.batch_size = cfg, encoder, batch_size
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in itertools.count(self.start_batch + worker, workers):
            first = (b * self.world_size + self.rank) * self.batch_size
            positions = range(first, first + self.batch_size)
            yield dict(make_batch(self.cfg, self.encoder, "train", positions), position=torch.tensor(positions))


def make_batch(cfg, encoder: CaptionEncoder, split: str, indices) -> dict:
    """Renders and captions videos `indices` of `split`: dict(video, text, text_mask, caption)."""
    scene = sample_scene(cfg.seed, split, list(indices), cfg.max_shapes)
    text, text_mask = encoder.encode(scene.captions)
    video = render(scene, cfg.frames, cfg.height, cfg.width)
    return {"video": video, "text": text, "text_mask": text_mask, "caption": scene.captions}


def build(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1, start_batch: int = 0,
          report=None):
    """Train loader (infinite, this rank's shard) and the full fixed eval set (a single batch dict; rendered at once,
    so `report` hears nothing)."""
    encoder = CaptionEncoder(VOCAB, dim=cfg.text_dim, max_len=cfg.text_len, seed=cfg.seed)
    stream = SyntheticVideos(cfg, encoder, batch_size, rank, world_size, start_batch)
    # Its own generator: DataLoader draws worker base seeds from it instead of the global RNG, which the
    # trainer keeps for training noise (and restores on resume).
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return loader, make_batch(cfg, encoder, "eval", range(eval_samples))
