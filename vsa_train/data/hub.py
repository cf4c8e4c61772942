"""Hugging Face Hub datasets for data=hf: telling a dataset id from a local path, resolving it to one commit before
any run directory is made, and the repo's video files.

data.path names a local file or folder when one exists there; otherwise a path of the form `org/name` (one slash,
no `.`/`..` segments) is a Hub dataset id. (`./org/name` forces a local path.) The id is resolved once per process:
through the Hub's API to a commit hash, or, with HF_HUB_OFFLINE=1 or a Hub that cannot be reached, from the local
Hub cache (HF_HUB_CACHE: datasets--org--name/refs/<revision> -> snapshots/<commit>/). A dataset with a loading
script (<name>.py at the repo's root) is refused: vsa_train runs no code that comes with data.
"""
from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import MissingInput
from .batching import BadInput

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TIMEOUT_S = 30.0  # the API call that resolves the id: a Hub that hangs fails the launch instead of blocking it


def is_hub_id(path: str) -> bool:
    """Whether data.path names a Hub dataset: no local file or folder has that name, and it reads as org/name."""
    return (not Path(path).exists() and _ID.fullmatch(path) is not None
            and not any(part in (".", "..") for part in path.split("/")))


@dataclass(frozen=True)
class HubDataset:
    """A Hub dataset resolved to one commit; `snapshot` is its local cache folder when the Hub was not asked."""

    repo_id: str
    commit: str
    snapshot: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}"


def _cache_folder(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"


def cached(repo_id: str, revision: str | None) -> HubDataset | None:
    """The dataset as the local Hub cache holds it at `revision` (a branch, tag or commit), or None."""
    folder, revision = _cache_folder(repo_id), revision or "main"
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision if _COMMIT.fullmatch(revision) else None
    if commit is None or not (folder / "snapshots" / commit).is_dir():
        return None
    return HubDataset(repo_id, commit, folder / "snapshots" / commit)


def _snapshot_files(snapshot: Path) -> list[str]:
    return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]


def _unreachable(err: Exception) -> bool:
    """A failure to talk to the Hub (no network, offline mode, a server error), not an answer about the id."""
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")


@lru_cache(maxsize=None)
def resolve(repo_id: str, revision: str | None = None) -> HubDataset:
    """The dataset at `revision` pinned to a commit; MissingInput (one line) for an unknown id or revision, a loading
    script, or a Hub that cannot be reached (offline included) with nothing in the local cache."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = f"data.path={repo_id!r}"
    if constants.HF_HUB_OFFLINE:
        dataset = cached(repo_id, revision)
        if dataset is None:
            raise MissingInput(f"{where}: HF_HUB_OFFLINE is set and the local Hub cache "
                               f"{_cache_folder(repo_id)} holds no snapshot of revision {revision or 'main'!r}")
    else:
        try:
            info = HfApi().dataset_info(repo_id, revision=revision, timeout=_TIMEOUT_S)
            dataset, files = HubDataset(repo_id, info.sha), [s.rfilename for s in info.siblings or ()]
        except RevisionNotFoundError:
            raise MissingInput(f"data.revision={revision!r}: the Hub dataset {repo_id!r} has no such branch, tag or "
                               "commit") from None
        except RepositoryNotFoundError:  # gated and private repos the token cannot see answer the same
            raise MissingInput(f"{where} is no local file or folder, and the Hub has no dataset {repo_id!r} that "
                               "this machine may read (a private or gated one needs `hf auth login`)") from None
        except Exception as err:  # noqa: BLE001 -- only a failure to reach the Hub falls back to the cache
            if not _unreachable(err):
                raise
            dataset = cached(repo_id, revision)
            if dataset is None:
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                raise MissingInput(f"{where}: the Hub cannot be reached ({reason}) and the local Hub cache "
                                   f"{_cache_folder(repo_id)} holds no snapshot of revision {revision or 'main'!r}"
                                   ) from None
            log.warning("%s: the Hub cannot be reached; using the cached snapshot %s", where, dataset.snapshot)
    if dataset.snapshot is not None:
        files = _snapshot_files(dataset.snapshot)
    script = f"{repo_id.split('/')[1]}.py"
    if script in files:  # the datasets convention for a loading script
        raise MissingInput(f"{where} comes with a loading script ({script}); vsa_train runs no code from a dataset: "
                           "use a dataset of data files (parquet, csv, json lines, or videos)")
    # A branch may move on: each checkpoint records this commit and a resume on another is refused (rundir.py)
    log.info("%s (revision %s) is commit %s", where, revision or "main", dataset.commit)
    return dataset


def repo_path(value: str, dataset: HubDataset) -> str | None:
    """The file in the dataset's repo that a row's video path names (relative to the repo's root, or an
    hf://datasets/<id>[@rev]/ URL of the same repo), normalised; None for an absolute local path;
    BadInput for one that leaves the repo or names another repo."""
    if value.startswith("hf://"):
        prefix = re.match(r"hf://datasets/([^/@]+/[^/@]+)(?:@[^/]+)?/", value)
        if prefix is None or prefix.group(1) != dataset.repo_id:
            raise BadInput(f"{value} is outside the dataset repo {dataset.repo_id}")
        value = value[prefix.end():]
    elif Path(value).is_absolute():
        return None
    file = posixpath.normpath(value.replace("\\", "/"))
    if file == ".." or file.startswith("../") or file.startswith("/"):
        raise BadInput(f"{value} is outside the dataset repo {dataset.repo_id}")
    return file


@dataclass(frozen=True)
class RepoFile:
    """A video file of a Hub dataset's repo, downloaded into the Hub cache when first loaded (`fetch`)."""

    dataset: HubDataset
    path: str

    def fetch(self) -> str:
        """The local file (the snapshot's, or downloaded at the pinned commit); BadInput when it cannot be had."""
        if self.dataset.snapshot is not None and (self.dataset.snapshot / self.path).is_file():
            return str((self.dataset.snapshot / self.path).resolve())
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(self.dataset.repo_id, self.path, repo_type="dataset",
                                   revision=self.dataset.commit)
        except EntryNotFoundError:
            raise BadInput(f"not in the dataset repo {self.dataset.name}") from None
        except Exception as err:  # noqa: BLE001 -- offline and not cached, network failures: this video is skipped
            if not _unreachable(err):
                raise
            raise BadInput(f"cannot be downloaded ({type(err).__name__})") from None


def text_cache(repo_id: str) -> Path:
    """Where a pretrained caption encoder caches a Hub dataset's embeddings: the datasets cache, not the Hub's
    snapshot (which mirrors the repo)."""
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "vsa_train_text" / repo_id.replace("/", "--")
