"""A local Hugging Face `datasets` dataset of videos: the video column stays undecoded and goes through decord.

`data.path` is a directory written by `save_to_disk`, or JSON-lines / CSV / parquet file(s) with a video
column (file paths, relative to the data file, or bytes) and a caption column.
"""
from pathlib import Path

from .videos import Clip, build_from_clips, caption_encoder

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_clips(cfg) -> list[Clip]:
    """The dataset's rows as clips (video column cast to `Video(decode=False)`: a path or the encoded bytes)."""
    from datasets import Dataset, DatasetDict, Video, load_dataset, load_from_disk

    path = Path(cfg.path)
    if path.is_dir():
        ds = load_from_disk(str(path))
        base = path
    elif path.suffix in _BUILDERS:
        ds = load_dataset(_BUILDERS[path.suffix], data_files=str(path), split=cfg.split)
        base = path.parent
    else:
        raise FileNotFoundError(f"data.path={str(path)!r} is neither a save_to_disk directory nor a "
                                f"{'/'.join(_BUILDERS)} file")
    if isinstance(ds, DatasetDict):
        if cfg.split not in ds:
            raise ValueError(f"data.split={cfg.split!r} not in {path} (splits: {list(ds)})")
        ds = ds[cfg.split]
    assert isinstance(ds, Dataset)
    for column in (cfg.video_column, cfg.caption_column):
        if column not in ds.column_names:
            raise ValueError(f"{path} has no column {column!r} (columns: {ds.column_names}); "
                             f"set data.video_column / data.caption_column")
    ds = ds.cast_column(cfg.video_column, Video(decode=False))
    clips = []
    for i, row in enumerate(ds):
        video, caption = row[cfg.video_column] or {}, (row[cfg.caption_column] or "").strip()
        if video.get("bytes"):
            clips.append(Clip(name=f"{path}[{i}]", source=video["bytes"], caption=caption))
        else:
            file = Path(video.get("path") or "")
            file = file if file.is_absolute() else base / file
            clips.append(Clip(name=f"{path}[{i}] {file}", source=str(file), caption=caption))
    if not clips:
        raise ValueError(f"{path} has no rows in split {cfg.split!r}")
    return clips


def build(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
    """data=hf: train loader and eval batch, exactly as data=videos but over the dataset's rows."""
    return build_from_clips(cfg, load_clips(cfg), batch_size=batch_size, eval_samples=eval_samples, rank=rank,
                            world_size=world_size, start_batch=start_batch)


def text_encoder(cfg):
    return caption_encoder(cfg, load_clips(cfg))
