"""A Hugging Face `datasets` dataset of videos, local or on the Hub: the video column stays undecoded and goes
through decord.

`data.path` is a local directory written by `save_to_disk`, JSON-lines / CSV / parquet file(s), or a Hub dataset id
`org/name` (hub.py says how the two are told apart and how an id is resolved: data.revision, and data.subset, the
dataset's config name), with a video column (file paths, bytes, or a `Video` feature) and a caption column of
data.split. Relative paths of a local dataset resolve against the folder that holds data.path (the data file's or
the save_to_disk directory's: rows written next to the dataset, as for a file); those of a Hub dataset name files of
its repo, downloaded at the resolved commit when a clip is first loaded.
Rows are checked as data=videos checks manifest rows: a path that is not a string or lies outside that folder (the
repo, or the caches holding it, for a Hub dataset; unless data.allow_outside_root=true), a caption that is not a
string or is over data.max_caption_bytes, make the row a bad clip "<path>[<row index>]" that is skipped and counted
when met (see listing.py).
data.streaming=true reads the rows as a stream (streaming.py) instead of holding them all in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingInput
from .batching import BadInput
from .hub import HubDataset, RepoFile, is_hub_id, repo_path, resolve
from .listing import Clip, RowRules, check_caption, check_path, checked, path_text, resolve_inside
from .videos import build_from_clips, caption_encoder

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _video_root(path: Path) -> Path:
    """The folder relative video paths resolve against: the one holding data.path, file or save_to_disk directory."""
    return path.parent  # a save_to_disk directory is one entry of its folder, as a data file is


def hub_dataset(cfg) -> HubDataset | None:
    """The Hub dataset data.path names (resolved once per process), or None for a local one."""
    return resolve(cfg.path, cfg.get("revision")) if is_hub_id(cfg.path) else None


def source_name(cfg) -> str:
    """The dataset for messages: data.path, or the Hub id at its commit."""
    hub = hub_dataset(cfg)
    return hub.name if hub else str(cfg.path)


@dataclass(frozen=True)
class RowReader:
    """Turns a dataset row into a Clip (a bad Clip holding the reason); picklable for DataLoader workers."""

    video_column: str
    caption_column: str
    rules: RowRules
    root: Path | None = None          # a local dataset's folder for relative paths
    hub: HubDataset | None = None     # a Hub dataset's repo for relative paths

    def __call__(self, name: str, row: dict) -> Clip:
        try:
            caption = check_caption(row[self.caption_column], self.rules)
            video = row[self.video_column]
            if isinstance(video, dict) and video.get("bytes"):
                return Clip(name=name, source=video["bytes"], caption=caption)
            path = path_text(video.get("path") if isinstance(video, dict) else video)  # a struct, or a path
            if self.hub is not None:
                return self._hub_clip(name, path, caption)
            file, real = check_path(path, self.root, self.rules, "the folder holding the dataset")
        except BadInput as e:
            return Clip.bad(name, str(e))
        return Clip(name=f"{name} {file}", source=str(real), caption=caption)

    def _hub_clip(self, name: str, path: str, caption: str) -> Clip:
        file = repo_path(path, self.hub)
        if file is not None:
            return Clip(name=f"{name} {file}", source=RepoFile(self.hub, file), caption=caption)
        # An absolute path: datasets' own copy of a repo file (the Hub cache, the datasets cache), else outside
        roots = _download_roots(self.hub)
        root = next((r for r in roots if Path(path).is_relative_to(r)), roots[0])
        real = resolve_inside(Path(path), root, self.rules, "the dataset's caches")
        snapshot = self.hub.snapshot
        shown = Path(path).relative_to(snapshot) if snapshot and Path(path).is_relative_to(snapshot) else path
        return Clip(name=f"{name} {shown}", source=str(real), caption=caption)


def _download_roots(hub: HubDataset) -> list[Path]:
    """Where datasets keeps the files of a Hub dataset it read: the repo's Hub cache folder, the datasets cache."""
    from datasets import config
    from huggingface_hub import constants

    return [Path(constants.HF_HUB_CACHE) / f"datasets--{hub.repo_id.replace('/', '--')}",
            Path(config.HF_DATASETS_CACHE)]


def row_reader(cfg) -> RowReader:
    hub = hub_dataset(cfg)
    return RowReader(cfg.video_column, cfg.caption_column, RowRules.from_cfg(cfg),
                     root=None if hub else _video_root(Path(cfg.path)), hub=hub)


def _load(cfg, streaming: bool):
    """data.split of the dataset, as a Dataset or (streaming) an IterableDataset, not yet checked."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    hub, path = hub_dataset(cfg), Path(cfg.path)
    try:
        if hub is not None:  # never trust_remote_code: hub.resolve refused loading scripts
            # From the cache: the snapshot folder, which datasets reads as the repo (README configs, file layout)
            where, pinned = (str(hub.snapshot), {}) if hub.snapshot else (hub.repo_id, {"revision": hub.commit})
            return load_dataset(where, name=cfg.get("subset"), split=cfg.split, streaming=streaming, **pinned)
        if path.suffix in _BUILDERS and not path.is_dir():
            return load_dataset(_BUILDERS[path.suffix], data_files=str(path), split=cfg.split, streaming=streaming)
    except ValueError as e:  # an unknown subset or split: datasets lists the ones there are
        raise MissingInput(f"{source_name(cfg)} (data.subset={cfg.get('subset')!r}, data.split={cfg.split!r}): "
                           f"{str(e).strip().splitlines()[0]}") from None
    if not path.is_dir():
        raise MissingInput(f"data.path={str(path)!r} is neither a save_to_disk directory nor a "
                           f"{'/'.join(_BUILDERS)} file")
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if cfg.split not in ds:
            raise MissingInput(f"data.split={cfg.split!r} not in {path} (splits: {list(ds)})")
        ds = ds[cfg.split]
    return ds.to_iterable_dataset() if streaming else ds


def open_dataset(cfg, streaming: bool = False):
    """data.split of the dataset with its columns checked and the video column as paths or undecoded `Video`
    (path or encoded bytes)."""
    from datasets import Value, Video

    ds = _load(cfg, streaming)
    columns = ds.column_names or []
    for column in (cfg.video_column, cfg.caption_column):
        if column not in columns:
            raise ValueError(f"{source_name(cfg)} has no column {column!r} (columns: {columns}); "
                             f"set data.video_column / data.caption_column")
    # A column of file paths (csv and parquet give large_string, which arrow cannot cast to the Video struct) is
    # read as it is; anything else (a Video or {path, bytes} column) is cast so that rows hold a path or bytes.
    feature = ds.features[cfg.video_column] if ds.features else None
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        ds = ds.cast_column(cfg.video_column, Video(decode=False))
    return ds


def load_clips(cfg) -> list[Clip]:
    """The dataset's rows as clips (all in memory: data.streaming=false)."""
    read, name = row_reader(cfg), source_name(cfg)
    clips = [read(f"{name}[{i}]", row) for i, row in enumerate(open_dataset(cfg))]
    return checked(clips, f"{name} (split {cfg.split!r})")


def _where(cfg) -> str:
    """The dataset and where its relative video paths lead, for messages."""
    hub = hub_dataset(cfg)
    if hub is not None:
        return f"{hub.name}, relative video paths from its repo"
    return f"{cfg.path}, relative video paths from {_video_root(Path(cfg.path)).resolve()}"


def build(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1, start_batch: int = 0,
          report=None, grad_accum: int = 1):
    """data=hf: train loader and eval batch, exactly as data=videos but over the dataset's rows (streamed with
    data.streaming=true)."""
    if cfg.get("streaming"):
        from . import streaming

        return streaming.build(cfg, open_dataset(cfg, streaming=True), row_reader(cfg), batch_size=batch_size,
                               eval_samples=eval_samples, rank=rank, world_size=world_size,
                               start_batch=start_batch, report=report, name=source_name(cfg),
                               source=_where(cfg))
    return build_from_clips(cfg, load_clips(cfg), batch_size=batch_size, eval_samples=eval_samples, rank=rank,
                            world_size=world_size, start_batch=start_batch, report=report, source=_where(cfg),
                            grad_accum=grad_accum)


def text_encoder(cfg):
    """The caption encoder training uses; a stream's is built without reading its captions (streaming.py)."""
    if cfg.get("streaming"):
        from . import streaming

        return streaming.text_encoder(cfg)
    return caption_encoder(cfg, load_clips(cfg))
