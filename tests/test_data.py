"""Synthetic videos: determinism, disjoint eval seeds, rank/worker sharding, resume offsets, rendering, captions."""
import itertools

import pytest
import torch
from omegaconf import OmegaConf

from vsa_train.data import build_data, data_spec
from vsa_train.data.synthetic import COLOURS, VOCAB, Scene, render, sample_scene
from vsa_train.data.text import CaptionEncoder


def _cfg(**overrides):
    base = {"name": "synthetic", "source": "synthetic", "frames": 4, "height": 16, "width": 16, "max_shapes": 2,
            "seed": 0, "text_len": 32, "text_dim": 32, "num_workers": 0}
    return OmegaConf.create({**base, **overrides})


def _batches(cfg, n, **kwargs):
    kwargs = dict({"batch_size": 3, "eval_samples": 4}, **kwargs)
    it = iter(build_data(cfg, **kwargs).train)
    return [next(it) for _ in range(n)]


def test_batch_format_matches_the_spec():
    cfg = _cfg()
    data = build_data(cfg, batch_size=3, eval_samples=5)
    spec = data_spec(cfg)
    batch = next(iter(data.train))
    assert batch["video"].shape == (3, spec.in_channels, *spec.video_shape)
    assert batch["video"].dtype == torch.float32
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
    assert batch["text"].shape == (3, spec.text_len, spec.text_dim) and batch["text"].dtype == torch.float32
    assert batch["text_mask"].dtype == torch.bool and batch["text_mask"].any(dim=1).all()
    assert len(batch["caption"]) == 3 and all(any(c in cap for c in COLOURS) for cap in batch["caption"])
    assert data.eval["video"].shape[0] == 5


def test_same_seed_same_videos_other_seed_other_videos():
    a, b = _batches(_cfg(), 2), _batches(_cfg(), 2)
    c = _batches(_cfg(seed=1), 2)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x["video"], y["video"]) and x["caption"] == y["caption"]
        assert not torch.equal(x["video"], z["video"])


def test_eval_videos_are_not_training_videos():
    cfg = _cfg()
    eval_set = build_data(cfg, batch_size=4, eval_samples=8).eval
    train = torch.cat([b["video"] for b in _batches(cfg, 16, batch_size=4)])  # the first 64 training videos
    distance = (eval_set["video"][:, None] - train[None]).flatten(2).abs().amax(-1)  # [8, 64]
    assert distance.min() > 0.1
    # the same index of the two splits draws from different seeds
    assert sample_scene(0, "train", [0], 2).captions != sample_scene(0, "eval", [0], 2).captions


def test_ranks_split_the_global_batch():
    cfg = _cfg()
    whole = _batches(cfg, 2, batch_size=4)
    ranks = [_batches(cfg, 2, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for b in range(2):
        assert torch.equal(torch.cat([ranks[0][b]["video"], ranks[1][b]["video"]]), whole[b]["video"])
        assert ranks[0][b]["caption"] + ranks[1][b]["caption"] == whole[b]["caption"]


def test_order_does_not_depend_on_workers_and_start_batch_skips():
    plain = _batches(_cfg(), 4)
    workers = _batches(_cfg(num_workers=2), 4)
    resumed = _batches(_cfg(), 2, start_batch=2)
    for x, y in zip(plain, workers):
        assert torch.equal(x["video"], y["video"])
    for x, y in zip(plain[2:], resumed):
        assert torch.equal(x["video"], y["video"])


def _one_red_square(motion_x: float) -> Scene:
    return Scene(start=torch.tensor([[[0.0, 0.5]]]), velocity=torch.tensor([[[motion_x, 0.0]]]),
                 radius=torch.tensor([[0.2]]), colour=torch.tensor([[[1.0, 0.0, 0.0]]]), shape=torch.tensor([[1]]),
                 texture=torch.tensor([[0]]), active=torch.tensor([[True]]), bg_colour=torch.tensor([[0.0, 0.0, 1.0]]),
                 bg_pattern=torch.tensor([0]), captions=["a plain red square bouncing left to right"])


def test_render_moves_the_shape_and_keeps_it_in_frame():
    video = render(_one_red_square(0.5), frames=6, height=32, width=32)  # [1, 3, 6, 32, 32]
    red = (video[0, 0] > 0.5) & (video[0, 2] < 0)  # shape pixels: red, not the blue background
    xs = torch.arange(32.0)
    centroid = [(red[t].float().sum(0) * xs).sum() / red[t].sum() for t in range(6)]
    assert all(red[t].sum() > 20 for t in range(6))
    assert all(b > a for a, b in itertools.pairwise(centroid))  # moves left to right
    still = render(_one_red_square(0.0), frames=3, height=32, width=32)
    assert torch.equal(still[0, :, 0], still[0, :, 2])


def test_render_bounces_off_the_wall():
    video = render(_one_red_square(3.0), frames=16, height=32, width=32)
    red = (video[0, 0] > 0.5) & (video[0, 2] < 0)
    xs = torch.arange(32.0)
    centroid = torch.stack([(red[t].float().sum(0) * xs).sum() / red[t].sum() for t in range(16)])
    steps = centroid.diff()
    assert (steps > 0).any() and (steps < 0).any()  # turned around at least once
    assert red[:, :, 0].sum() + red[:, :, -1].sum() < 16 * 12  # never squeezed past the edge


def test_caption_encoder():
    enc = CaptionEncoder(VOCAB, dim=16, max_len=6, seed=0)
    emb, mask = enc.encode(["a red circle", "a zebra circle bouncing left to right upwards quickly"])
    assert emb.shape == (2, 6, 16) and mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert torch.equal(emb[0, 3:], torch.zeros(3, 16))  # padding is zero
    assert enc.tokenize("a zebra")[1] == 0  # unknown word
    again, _ = CaptionEncoder(VOCAB, dim=16, max_len=6, seed=0).encode(["a red circle"])
    assert torch.equal(again[0], emb[0])
    other, _ = CaptionEncoder(VOCAB, dim=16, max_len=6, seed=0).encode(["a blue circle"])
    assert not torch.equal(other[0, 1], emb[0, 1]) and torch.equal(other[0, 2], emb[0, 2])
    with pytest.raises(ValueError, match="even"):
        CaptionEncoder(VOCAB, dim=15)
