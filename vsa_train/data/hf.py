"""A local Hugging Face `datasets` dataset of videos: the video column stays undecoded and goes through decord.

`data.path` is a directory written by `save_to_disk`, or JSON-lines / CSV / parquet file(s) with a video
column (file paths or bytes) and a caption column. Relative paths resolve against the folder that holds
data.path, the data file's or the save_to_disk directory's (so rows written next to the dataset, as for a file).
Rows are checked as data=videos checks manifest rows: a path that is not a string or lies outside that folder
(unless data.allow_outside_root=true), a caption that is not a string or is over data.max_caption_bytes, make the
row a bad clip "<path>[<row index>]" that is skipped and counted when met (see videos.py).
"""
from pathlib import Path

from ..errors import MissingInput
from .batching import BadInput
from .videos import Clip, RowRules, build_from_clips, caption_encoder, check_caption, check_path, checked

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _video_root(path: Path) -> Path:
    """The folder relative video paths resolve against: the one holding data.path, file or save_to_disk directory."""
    return path.parent  # a save_to_disk directory is one entry of its folder, as a data file is


def _row_clip(name: str, video, caption, base: Path, rules: RowRules) -> Clip:
    """One dataset row as a Clip (bytes kept as they are, paths checked), or a bad Clip holding the reason."""
    try:
        caption = check_caption(caption, rules)
        if isinstance(video, dict) and video.get("bytes"):
            return Clip(name=name, source=video["bytes"], caption=caption)
        path = video.get("path") if isinstance(video, dict) else video  # a struct, or a path string as it is
        file, real = check_path(path, base, rules, "the folder holding the dataset")
    except BadInput as e:
        return Clip.bad(name, str(e))
    return Clip(name=f"{name} {file}", source=str(real), caption=caption)


def load_clips(cfg) -> list[Clip]:
    """The dataset's rows as clips: a video column of paths as it is, any other cast to `Video(decode=False)`
    (a path or the encoded bytes)."""
    from datasets import Dataset, DatasetDict, Value, Video, load_dataset, load_from_disk

    path = Path(cfg.path)
    if path.is_dir():
        ds = load_from_disk(str(path))
    elif path.suffix in _BUILDERS:
        ds = load_dataset(_BUILDERS[path.suffix], data_files=str(path), split=cfg.split)
    else:
        raise MissingInput(f"data.path={str(path)!r} is neither a save_to_disk directory nor a "
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
    # A column of file paths (csv and parquet give large_string, which arrow cannot cast to the Video struct) is
    # read as it is; anything else (a Video or {path, bytes} column) is cast so that rows hold a path or bytes.
    feature = ds.features[cfg.video_column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        ds = ds.cast_column(cfg.video_column, Video(decode=False))
    rules = RowRules.from_cfg(cfg)
    clips = [_row_clip(f"{path}[{i}]", row[cfg.video_column], row[cfg.caption_column], _video_root(path), rules)
             for i, row in enumerate(ds)]
    return checked(clips, f"{path} (split {cfg.split!r})")


def build(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1, start_batch: int = 0,
          report=None):
    """data=hf: train loader and eval batch, exactly as data=videos but over the dataset's rows."""
    return build_from_clips(cfg, load_clips(cfg), batch_size=batch_size, eval_samples=eval_samples, rank=rank,
                            world_size=world_size, start_batch=start_batch, report=report,
                            source=f"{cfg.path}, relative video paths from {_video_root(Path(cfg.path)).resolve()}")


def text_encoder(cfg):
    return caption_encoder(cfg, load_clips(cfg))
