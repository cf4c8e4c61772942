"""What the model needs to know about the data (its own module: sources build it, the package hands it out)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """What the model needs to know about the data: channels, text width and length, video (T, H, W), and the
    (T, H, W) of each bucket with data.buckets (a batch's `bucket` indexes them; empty: every batch is video_shape)."""

    in_channels: int
    text_dim: int
    text_len: int
    video_shape: tuple[int, int, int]
    buckets: tuple = ()
