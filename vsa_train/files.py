"""Durable file writes for the run directory: atomic replace, fsync, and errors that name the disk's free space."""
import errno
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path


def disk_error(err: OSError, path, needed: int | None = None) -> OSError:
    """An OSError that names the path, the bytes left on its file system and, if known, the bytes the write
    needed; a full disk says so plainly (ENOSPC, EDQUOT, or an error without errno while less is free than
    needed: safetensors' own errors may carry none)."""
    where = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("/"))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    what = err.strerror or str(err) or type(err).__name__
    short = err.errno is None and needed is not None and free is not None and free < needed
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or short:
        what = f"disk full ({what})"
    sizes = ("free space unknown" if free is None else f"{free:,} bytes free") + " on that file system"
    if needed is not None:
        sizes += f"; writing it needs about {needed:,} bytes"
    return OSError(err.errno, f"cannot write {path}: {what} ({sizes})")


@contextmanager
def naming_free_space(path):
    """Re-raises an OSError inside the block as `disk_error` for `path`."""
    try:
        yield
    except OSError as err:
        raise disk_error(err, path) from err


def atomic_write(path, data: bytes | str) -> None:
    """Replaces `path` by `data` at once (temporary file in the same folder, fsync, rename): a crash leaves the
    old file or the new one, never a mix. Keeps the mode of an existing file."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    with naming_free_space(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the file
            mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
            os.chmod(tmp, mode)  # mkstemp makes it owner-only
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def fsync_dir(directory) -> None:
    """Makes a rename in `directory` durable, where the OS and file system allow it."""
    with suppress(AttributeError, OSError):  # some file systems refuse to fsync a directory
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path) -> None:
    """Flushes every file and directory under path to disk, so that a rename publishes durable data."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)
