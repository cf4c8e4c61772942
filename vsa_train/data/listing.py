"""Listing clips: the rows of a manifest (CSV or JSON lines) or the video files under a folder, each checked.

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
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingInput
from .batching import BadInput

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v")
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
# root (this file is vsa_train/data/listing.py), not from the current folder.
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
