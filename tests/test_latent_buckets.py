"""Bucketed latents: scripts/encode_latents.py with data.buckets over clips of mixed shapes (one bucket per shard,
unfit clips recorded, re-runs skip finished shards) and data=latents over them (one-bucket batches at the latent
shapes, the same bucket on every rank, exact resume, holdout in clip order, damaged shards counted, a short run)."""
import itertools
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_latents import ROOT, encode_latents, vae_dir  # noqa: F401 -- vae_dir: the tiny random Wan VAE fixture

from vsa_train.data import build_data, listing, data_spec, video_io, videos
from vsa_train.data.latents import encode_videos, load_vae

# Pixel buckets (stride 2) and their latents (4 channels; 4x temporal, 8x spatial): the token grids at patch
# (1, 2, 2), 2x1x1, 2x1x2 and 3x1x3, all have edge tiles against the 4 x 4 x 4 VSA tile.
BUCKETS = [[5, 16, 16], [5, 16, 32], [9, 16, 48]]
LATENTS = [[4, 2, 2, 2], [4, 2, 2, 4], [4, 3, 2, 6]]
# name: (height, width, frames, bucket or None); in manifest order, so the clip order differs from the buckets'.
# Widths are multiples of 32: decord misreads narrower odd-sized frames.
CLIPS = {"square a": (32, 32, 12, 0), "wide a": (32, 64, 12, 1), "pano a": (32, 96, 20, 2),
         "tiny": (8, 32, 12, None), "square b": (64, 64, 12, 0), "short": (32, 32, 2, None),
         "wide b": (16, 32, 12, 1), "corrupt": (0, 0, 0, None),
         "pano short": (32, 96, 12, 1),  # 3:1 but too short for 9 frames at stride 2: the closest that fits
         "pano b": (16, 96, 20, 2)}
NAMES = list(CLIPS)
MEMBERS = [[NAMES.index(n) for n, c in CLIPS.items() if c[3] == b] for b in range(3)]  # [[0, 4], [1, 6, 8], [2, 9]]
SHARDS = {"shard_5x16x16_00000.safetensors": [0, 4], "shard_5x16x32_00000.safetensors": [1, 6],
          "shard_5x16x32_00001.safetensors": [8], "shard_9x16x48_00000.safetensors": [2, 9]}
pytestmark = pytest.mark.xdist_group("latent_buckets")  # one xdist worker: the module-scoped encode built once
OVERRIDES = ["data=videos", "data.stride=2", "data.num_workers=0",
             f"data.buckets={BUCKETS}".replace(" ", "")]


def _clips(root: Path) -> Path:
    """The clips of CLIPS written as .mp4 (a gradient moving over noise; `corrupt`: junk bytes) and their manifest."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (h, w, t, _) in CLIPS.items():
        file = root / f"{name.replace(' ', '_')}.mp4"
        if name == "corrupt":
            file.write_bytes(b"\x00" * 3000)
        else:
            ramp = torch.linspace(-1, 1, w).view(1, 1, 1, w) + torch.linspace(0, 1, t).view(1, t, 1, 1)
            video = (0.6 * ramp.expand(3, t, h, w) + 0.3 * torch.rand(3, t, h, w, generator=g) - 0.3).clamp(-1, 1)
            video_io.write_video(video, file)
        rows.append(f"{file.name},{name}\n")
    (root / "clips.csv").write_text("path,caption\n" + "".join(rows))
    return root / "clips.csv"


def _encode(root: Path, vae: Path, out: str = "latents") -> Path:
    manifest = root / "clips.csv" if (root / "clips.csv").exists() else _clips(root)
    encode_latents.main(["--vae", str(vae), "--out", str(root / out), "--shard-size", "2", "--batch-size", "2",
                         *OVERRIDES, f"data.manifest={manifest}"])
    return root / out


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, vae_dir):  # noqa: F811 -- the fixture imported above
    """The mixed clips encoded once into bucketed shards."""
    return _encode(tmp_path_factory.mktemp("bucketed"), vae_dir)


def _cfg(out: Path, **overrides):
    return OmegaConf.merge(OmegaConf.load(ROOT / "configs/data/latents.yaml"),
                           {"path": str(out), "num_workers": 0, **overrides})


def test_each_shard_holds_one_bucket_and_the_index_lists_them(bucketed, vae_dir):  # noqa: F811
    index = json.loads((bucketed / "index.json").read_text())
    assert [b["shape"] for b in index["buckets"]] == BUCKETS and [b["latent_shape"] for b in index["buckets"]] == LATENTS
    assert "shards" not in index and "latent_shape" not in index  # no single shape for older readers to misread
    assert [b["count"] for b in index["buckets"]] == [2, 3, 2] and index["count"] == 7
    listed = {s["file"]: s["clips"] for b in index["buckets"] for s in b["shards"]}
    assert listed == SHARDS  # bucket by bucket, each bucket's clips in list order, two per shard
    for b, bucket in enumerate(index["buckets"]):
        for shard in bucket["shards"]:
            stored = load_file(str(bucketed / shard["file"]))
            assert list(stored["latent"].shape) == [shard["count"], *LATENTS[b]] and shard["checksums"]
    skipped = sorted(index["skipped"])
    assert len(skipped) == 3
    assert "corrupt.mp4: unreadable" in skipped[0]
    assert "short.mp4: fits no bucket: too short (2 frames" in skipped[1]
    assert "tiny.mp4: fits no bucket: too small (32x8 would be upscaled x2.00" in skipped[2]
    # an item is the VAE's latent of the clip as the video source reads it at its bucket's shape
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs/data/videos.yaml"), {"stride": 2})
    clip = listing.Clip("pano_b.mp4", str(bucketed.parent / "pano_b.mp4"), "pano b")
    pixels = videos.load_clip(clip, cfg, start=0.5, shape=tuple(BUCKETS[2]))
    torch.testing.assert_close(load_file(str(bucketed / "shard_9x16x48_00000.safetensors"))["latent"][1],
                               encode_videos(load_vae(vae_dir), pixels[None])[0], rtol=1e-4, atol=1e-4)


def test_the_shard_plan_is_fixed_and_split_by_process():
    fits = [c[3] for c in CLIPS.values()]
    plan = encode_latents.shard_plan(fits, [tuple(s) for s in BUCKETS], 2)
    assert {s.file: s.clips for s in plan} == SHARDS and [s.bucket for s in plan] == [0, 1, 1, 2]
    assert [s.file for k, s in enumerate(plan) if k % 2 == 1] == ["shard_5x16x32_00000.safetensors",
                                                                  "shard_9x16x48_00000.safetensors"]  # process 1 of 2
    assert [s.file for s in encode_latents.shard_plan([0] * 5, None, 2)] == [f"shard_{k:05d}.safetensors"
                                                                             for k in range(3)]  # as before buckets


def test_a_rerun_skips_finished_shards(tmp_path, bucketed, vae_dir):  # noqa: F811
    out = shutil.copytree(bucketed, tmp_path / "latents")
    shutil.copy(bucketed.parent / "clips.csv", tmp_path)
    for name in NAMES:
        shutil.copy(bucketed.parent / f"{name.replace(' ', '_')}.mp4", tmp_path)
    redo = out / "shard_5x16x32_00001.safetensors"
    before = load_file(str(redo))["latent"]
    redo.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    _encode(tmp_path, vae_dir)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*") if p != redo} == kept
    torch.testing.assert_close(load_file(str(redo))["latent"], before)
    assert _index(out, tmp_path) == _index(bucketed, bucketed.parent)


def _index(out: Path, clips: Path) -> dict:
    """index.json of `out` with the folder of the clips it names (in its skipped inputs) left out."""
    return json.loads((out / "index.json").read_text().replace(str(clips), "<clips>"))


def test_data_latents_yields_one_bucket_batches_the_same_on_every_rank(bucketed):
    cfg = _cfg(bucketed)
    spec = data_spec(cfg)
    assert spec.in_channels == 4 and spec.buckets == tuple(tuple(s[1:]) for s in LATENTS)
    assert spec.video_shape == tuple(LATENTS[0][1:])  # the first bucket: the default shape
    ranks = [list(itertools.islice(build_data(cfg, batch_size=2, eval_samples=2, rank=r, world_size=2).train, 12))
             for r in range(2)]
    for a, b in zip(*ranks):
        assert a["bucket"] == b["bucket"]
        for batch in (a, b):
            assert batch["video"].shape == (2, *LATENTS[batch["bucket"]]) and torch.isfinite(batch["video"]).all()
            assert {NAMES.index(c) for c in batch["caption"]} <= set(MEMBERS[batch["bucket"]])
    assert {b["bucket"] for b in ranks[0]} == {0, 1, 2}
    eval_set = build_data(cfg, batch_size=2, eval_samples=2).eval
    assert [b["bucket"] for b in eval_set] == [0, 1, 2]
    assert [b["video"].shape[2:] for b in eval_set] == [torch.Size(s[1:]) for s in LATENTS]


def _samples(cfg, batch_size, n, **kw) -> list:
    """(bucket, position, caption) of every sample of the first n batches, in stream order."""
    data = build_data(cfg, batch_size=batch_size, eval_samples=2, **kw)
    return [(batch["bucket"], int(p), c) for batch in itertools.islice(data.train, n)
            for p, c in zip(batch["position"], batch["caption"])]


def test_exact_resume_and_holdout_in_clip_order(bucketed):
    cfg = _cfg(bucketed)
    whole = _samples(cfg, 4, 10)  # one rank, global batch 4
    assert _samples(cfg, 4, 4, start_batch=6) == whole[24:]
    two_ranks = [_samples(cfg, 2, 4, rank=r, world_size=2, start_batch=6) for r in range(2)]
    assert sorted(two_ranks[0] + two_ranks[1], key=lambda s: s[1]) == whole[24:]  # 2 ranks of 2: the same samples
    # data.holdout=2: the last two clips of the list (pano short, bucket 1; pano b, bucket 2) are eval-only
    data = build_data(_cfg(bucketed, holdout=2), batch_size=2, eval_samples=2)
    assert [(b["bucket"], set(b["caption"])) for b in data.eval] == [(1, {"pano short"}), (2, {"pano b"})]
    trained = {c for batch in itertools.islice(data.train, 20) for c in batch["caption"]}
    assert trained == {"square a", "square b", "wide a", "wide b", "pano a"}


def test_data_buckets_must_be_the_index_s_and_weights_one_per_bucket(tmp_path, bucketed):
    assert data_spec(_cfg(bucketed, buckets=BUCKETS)).buckets == tuple(tuple(s[1:]) for s in LATENTS)
    with pytest.raises(ValueError, match=r"data.buckets=\[\[5, 16, 16\]\] contradicts the index.json of these "
                                         r"latents, encoded at buckets \[\[5, 16, 16\], \[5, 16, 32\], \[9, 16, 48\]\]"):
        data_spec(_cfg(bucketed, buckets=BUCKETS[:1]))
    with pytest.raises(ValueError, match="data.bucket_weights has 2 weights for the 3 buckets of index.json"):
        data_spec(_cfg(bucketed, bucket_weights=[1, 1]))
    stream = build_data(_cfg(bucketed, bucket_weights=[1, 0, 1]), batch_size=2, eval_samples=2).train.dataset
    assert stream.probs.tolist() == [0.5, 0.0, 0.5]
    one_shape = tmp_path / "one_shape"  # latents without buckets take no data.buckets
    one_shape.mkdir()
    (one_shape / "index.json").write_text(json.dumps({"latent_shape": [4, 2, 2, 2], "text_shape": [6, 16], "shards": [
        {"file": "shard_00000.safetensors", "count": 1}]}))
    with pytest.raises(ValueError, match=r"contradicts the index.json of these latents, encoded at one shape, "
                                         "without buckets; data=latents trains on the index's"):
        data_spec(_cfg(one_shape, buckets=BUCKETS))
    # checked with the config, in one line each: a contradiction, and latents the model's patch does not divide
    from hydra import compose, initialize_config_dir

    from vsa_train.config_schema import typed
    from vsa_train.fields import ConfigError

    index = json.loads((bucketed / "index.json").read_text())
    index["buckets"][1]["latent_shape"] = [4, 2, 2, 3]  # as if encoded at 5 x 16 x 24
    (one_shape / "index.json").write_text(json.dumps(index))
    for path, extra, line in [(bucketed, ["data.buckets=[[5,16,16]]"], "data.buckets=[[5, 16, 16]] contradicts"),
                              (one_shape, [], "the buckets' latent (T, H, W) [[2, 2, 3]] must be divisible by "
                                              "model.patch_size = [1, 2, 2]")]:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose(config_name="train", overrides=["data=latents", f"data.path={path}", *extra])
        cfg.run_dir = str(tmp_path / "run")
        with pytest.raises(ConfigError) as e:
            typed(cfg)
        assert len(e.value.problems) == 1 and line in e.value.problems[0] and "\n" not in e.value.problems[0]


def test_a_truncated_bucket_shard_is_skipped_and_counted(tmp_path, bucketed, caplog):
    out = shutil.copytree(bucketed, tmp_path / "latents")
    path = out / "shard_5x16x32_00000.safetensors"  # wide a, wide b: bucket 1 keeps pano short
    path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        batches = list(itertools.islice(build_data(_cfg(out), batch_size=2, eval_samples=2).train, 12))
    skipped = [s for b in batches for s in b["skipped"]]
    assert sorted(s.split(": ", 1)[0] for s in skipped) == [f"shard_5x16x32_00000.safetensors[{j}]" for j in (0, 1)]
    assert all("unreadable" in s for s in skipped)
    assert all(set(b["caption"]) == {"pano short"} for b in batches if b["bucket"] == 1)
    assert any(b["bucket"] == 1 for b in batches) and "shard_5x16x32_00000.safetensors" in caplog.text


def test_a_short_bucketed_training_run_on_latents(tmp_path, bucketed, one_thread):
    from hydra import compose, initialize_config_dir

    from vsa_train import trainer
    from vsa_train.metrics import read_metrics

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=[
            "data=latents", f"data.path={bucketed}", "model=dit_tiny", "attn=vsa", "attn.sparsity=0.5",
            "train.batch_size=2", "train.max_steps=2", "train.eval_samples=2", "train.eval_timesteps=1",
            "train.eval_every=2", "train.log_every=1", "logger=none", f"run_dir={tmp_path / 'run'}"])
    last = trainer.train(cfg)
    assert last["step"] == 2
    final = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    per_bucket = [final[f"eval/loss/{'x'.join(map(str, s[1:]))}"] for s in LATENTS]
    assert all(map(torch.isfinite, torch.tensor(per_bucket)))
    assert final["eval/loss"] == pytest.approx(sum(per_bucket) / 3, rel=1e-6)


@pytest.mark.slow
def test_bucketed_encode_on_two_processes(tmp_path, bucketed, vae_dir):  # noqa: F811
    """torchrun: the processes probe half the clips each and pool them, split the shards by k mod 2, and rank 0
    writes the same index as one process does."""
    shutil.copy(bucketed.parent / "clips.csv", tmp_path)
    for name in NAMES:
        shutil.copy(bucketed.parent / f"{name.replace(' ', '_')}.mp4", tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "encode_latents.py"), "--vae", str(vae_dir), "--out", str(tmp_path / "out"),
           "--shard-size", "2", "--batch-size", "2", *OVERRIDES, f"data.manifest={tmp_path / 'clips.csv'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encode[0]" in result.stderr and "encode[1]" in result.stderr
    assert _index(tmp_path / "out", tmp_path) == _index(bucketed, bucketed.parent)
    for file in SHARDS:
        torch.testing.assert_close(load_file(str(tmp_path / "out" / file)), load_file(str(bucketed / file)))
