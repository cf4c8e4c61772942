"""Every video shape per call (issue 31, item 2's model and trainer side): one model and one run over three shapes,
one with odd edges (token grids not a multiple of the tile), by hand-built single-shape batches: per-shape VSA
topk, FLOPs against an independent count and summed exactly, eval per bucket, samples at a configured shape,
compiled blocks with one graph per shape."""
import copy
import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vsa_train import trainer, training_run
from vsa_train.config_schema import typed
from vsa_train.evaluation import evaluate, make_eval_set
from vsa_train.flops import training_flops_per_sample
from vsa_train.metrics import read_metrics
from vsa_train.models import build_model, rope
from vsa_train.models import vsa as vsa_module
from vsa_train.models.rope import grid_positions, rope_cos_sin
from vsa_train.parallel import compile_blocks
from vsa_train.sampling import prompt_noise

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "test", "hidden_size": 128, "depth": 2, "num_heads": 2}  # head dim 64; patch (1, 2, 2)
VSA = {"name": "vsa", "sparsity": 0.5}  # half of each shape's tiles, so that topk differs between shapes
# Pixels (T, H, W) -> token grids at patch (1, 2, 2) -> tiles of (4, 4, 4) -> topk at sparsity 0.5:
#   (4, 16, 16) -> (4, 8, 8):  1 x 2 x 2 = 4 tiles, whole tiles              -> topk 2
#   (5, 10, 14) -> (5, 5, 7):  2 x 2 x 2 = 8 tiles, odd edges on every axis    -> topk 4
#   (3, 8, 20)  -> (3, 4, 10): 1 x 1 x 3 = 3 tiles, odd edges on t and w       -> topk round(1.5) = 2
SHAPES = [(4, 16, 16), (5, 10, 14), (3, 8, 20)]
TILES = {(4, 16, 16): 4, (5, 10, 14): 8, (3, 8, 20): 3}
TOPK = {(4, 16, 16): 2, (5, 10, 14): 4, (3, 8, 20): 2}
TEXT_DIM = 16


def make(attn_cfg=VSA, seed=0):
    torch.manual_seed(seed)
    model = build_model(TINY, attn_cfg, in_channels=3, text_dim=TEXT_DIM)
    torch.nn.init.normal_(model.final.linear.weight, std=0.02)  # non-zero outputs
    return model


def inputs(shape, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, *shape, generator=g), torch.rand(B, generator=g), torch.randn(B, 5, TEXT_DIM, generator=g),
            torch.ones(B, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------- the model

def test_one_model_takes_each_shape_with_its_own_tiles_and_topk(monkeypatch):
    """Alternating shapes: each call's output is that shape's alone (nothing kept from another shape), with topk the
    configured fraction of that shape's tiles; RoPE tables are built once per shape and equal the uncached ones."""
    seen = []
    real = vsa_module.video_sparse_attention_tiled

    def recording(q, k, v, layout, topk, *args, **kwargs):
        seen.append((layout.n_tiles, topk))
        return real(q, k, v, layout, topk, *args, **kwargs)

    monkeypatch.setattr(vsa_module, "video_sparse_attention_tiled", recording)
    model = make()
    alone = {shape: make()(*inputs(shape)) for shape in SHAPES}  # a fresh model per shape
    for shape in SHAPES + SHAPES:
        seen.clear()
        torch.testing.assert_close(model(*inputs(shape)), alone[shape], rtol=0, atol=0)
        assert seen == [(TILES[shape], TOPK[shape])] * TINY["depth"]
    for shape in SHAPES:
        grid = (shape[0], shape[1] // 2, shape[2] // 2)
        positions, cos, sin = rope.rope_tables(grid, 64, 10000.0, "cpu")
        assert rope.rope_tables(grid, 64, 10000.0, "cpu")[1] is cos  # cached per shape
        want = rope_cos_sin(grid_positions(grid), 64)
        torch.testing.assert_close((cos, sin), want, rtol=0, atol=0)
        ctx = model.context(grid, "cpu")  # in tile order: the same angles as computed on the permuted positions
        torch.testing.assert_close((ctx.cos, ctx.sin), rope_cos_sin(ctx.positions, 64), rtol=0, atol=0)


def test_the_schedule_gives_each_shape_its_topk_and_tiles():
    config = typed(_cfg("/tmp/unused", "attn=vsa", "attn.sparsity=0.5", "attn.schedule=ramp"))
    sparsity = training_run.SparsitySchedule(config.model, config.attn, config.spec)
    for shape in SHAPES:
        assert sparsity.tiles_of(shape) == TILES[shape]
        assert sparsity.topk(10_000, shape) == TOPK[shape]  # the ramp's end: the target fraction of its tiles
        assert sparsity.topk(0, shape) == TILES[shape]  # the ramp's start: all of its tiles
    assert sparsity.topk(10_000) == sparsity.topk(10_000, config.spec.video_shape)  # default: the data's shape


# ----------------------------------------------------------------------------------------------------- FLOPs

def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # CPU fused SDPA counts 0
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", SHAPES)
def test_flops_per_shape_against_an_independent_count(shape):
    """Dense: torch's FlopCounterMode on the model's matmuls. VSA: the hand formula of each sparse layer (fine stage
    over topk tiles of the mean tile size, coarse scores and P·V_c over tiles, the coarse gate's projection)."""
    B, L, d, depth = 2, 5, TINY["hidden_size"], TINY["depth"]
    x, t, text, mask = inputs(shape, B)
    dense_model = make({"name": "dense"})
    fwd = counted(lambda: dense_model(x, t, text, mask)) / B
    kw = dict(in_channels=3, text_dim=TEXT_DIM, video_shape=shape, text_len=L)
    dense = training_flops_per_sample(TINY, {"name": "dense"}, **kw)
    assert dense.executed / 3 == pytest.approx(fwd, rel=1e-9)  # every matmul counted, nothing else
    S, n, k = shape[0] * shape[1] * shape[2] // 4, TILES[shape], TOPK[shape]
    sparse_layer = 4 * S * (k * S / n) * d + 2 * 2 * n * n * d + 2 * S * d * d
    vsa = training_flops_per_sample(TINY, VSA, **kw)
    assert vsa.dense == dense.executed
    assert vsa.executed == pytest.approx(dense.executed - 3 * depth * (4 * S * S * d - sparse_layer), rel=1e-12)


# ----------------------------------------------------------------------------------------------------- the trainer

COMMON = ["model=dit_tiny", "data.frames=4", "data.height=16", "data.width=16", "train.batch_size=2",
          "train.eval_samples=2", "train.eval_timesteps=2", "train.log_every=1", "logger=none", "train.eval_every=1000",
          "train.ckpt_every=1000"]


def _cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[*COMMON, f"run_dir={run_dir}", *overrides])


def bucket_of(index: int) -> tuple[int, int, int]:
    """The hand-made bucket sequence: A, B, C, A, B, C, ... by batch."""
    return SHAPES[index % len(SHAPES)]


class Buckets:
    """The real stream's batches (captions, positions) with videos of a shape per batch: one bucket per batch."""

    def __init__(self, loader, per_batch):
        self.loader, self.per_batch, self.dataset = loader, per_batch, loader.dataset

    def __iter__(self):
        for batch in self.loader:
            index = int(batch["position"][0]) // self.per_batch
            g = torch.Generator().manual_seed(index)
            yield dict(batch, video=torch.randn(len(batch["position"]), 3, *bucket_of(index), generator=g))


def eval_buckets(eval_batch: dict) -> list[dict]:
    """The eval batch's captions under each shape: a bucketed eval set of three single-bucket batches."""
    g = torch.Generator().manual_seed(7)
    return [dict(eval_batch, video=torch.randn(len(eval_batch["caption"]), 3, *shape, generator=g)) for shape in SHAPES]


@pytest.fixture
def bucketed(monkeypatch):
    """The data replaced by three shapes in turn, for train and eval (until data.buckets builds them itself)."""
    real = training_run.build_data

    def build_data(cfg, *, batch_size, world_size=1, **kwargs):
        data = real(cfg, batch_size=batch_size, world_size=world_size, **kwargs)
        return dataclasses.replace(data, train=Buckets(data.train, batch_size * world_size),
                                   eval=eval_buckets(data.eval))

    monkeypatch.setattr(training_run, "build_data", build_data)


def test_a_bucketed_run_sums_each_shapes_flops_and_stops_on_the_budget(tmp_path, bucketed, one_thread):
    """FLOPs of each step at its own shape, summed exactly; the run stops after the first step reaching the
    budget; eval/loss per bucket and overall (sample-weighted)."""
    config = typed(_cfg(tmp_path, "attn=vsa", "attn.sparsity=0.5"))
    sparsity = training_run.SparsitySchedule(config.model, config.attn, config.spec)
    per_step = [sparsity.flops_per_sample(s, bucket_of(s)).executed * 2 for s in range(9)]
    budget = sum(per_step[:4]) + 1.0  # reached by step 5's FLOPs, not before
    rows = _train(tmp_path, "attn=vsa", "attn.sparsity=0.5", "train.max_steps=50", f"train.flops_budget={budget}")
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["flops"] for r in steps] == list(itertools.accumulate(per_step[:5]))  # the trainer's order: exact
    assert len(set(per_step[:3])) == 3  # three shapes, three counts
    final = rows[-1]
    labels = ["4x16x16", "5x10x14", "3x8x20"]
    per_bucket = [final[f"eval/loss/{label}"] for label in labels]
    assert final["eval/loss"] == pytest.approx(sum(per_bucket) / 3, rel=1e-12)  # equal buckets: equal weights


def _train(run_dir, *overrides) -> list[dict]:
    trainer.train(_cfg(run_dir, *overrides))
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_a_step_sums_micro_steps_of_different_shapes(tmp_path, bucketed, one_thread):
    """grad_accum micro-steps of different buckets: each one's samples at its own FLOPs."""
    config = typed(_cfg(tmp_path, "attn=vsa", "train.grad_accum=3"))
    run = trainer.build_run(config, trainer.make_accelerator(config))
    try:
        assert trainer.train_step(run).ok
        want = sum(run.sparsity.flops_per_sample(0, shape).executed * 2 for shape in SHAPES)
        assert run.state.flops == pytest.approx(want, rel=1e-15)
        assert run.state.flops_dense == pytest.approx(
            sum(run.sparsity.flops_per_sample(0, shape).dense * 2 for shape in SHAPES), rel=1e-15)
    finally:
        run.close()


# ----------------------------------------------------------------------------------------------------- eval

def test_eval_per_bucket_and_overall_sample_weighted():
    """A list of single-bucket batches: each bucket's loss is what it gives alone; the overall mean weighs videos
    alike; one bucket's keys are today's."""
    model, accelerator = make(), Accelerator(cpu=True)
    groups = []
    for shape, n in zip(SHAPES, (2, 4, 2)):  # unequal buckets: the overall mean is weighted by videos
        x, _, text, mask = inputs(shape, B=n)
        groups.append({"video": x, "text": text, "text_mask": mask, "caption": [f"c{i}" for i in range(n)]})
    eval_set = make_eval_set(groups, num_timesteps=2, seed=0)
    loss = evaluate(model, eval_set, accelerator, batch_size=2)
    alone = [evaluate(model, dict(group, noise=group["noise"]), accelerator, batch_size=2) for group in eval_set]
    row = loss.row()
    for shape, one in zip(SHAPES, alone):
        assert row["eval/loss/" + "x".join(map(str, shape))] == pytest.approx(one.mean, rel=1e-12)
        assert set(one.row()) == {"eval/loss", "eval/loss_t0.2500", "eval/loss_t0.7500"}  # single shape: as before
    assert loss.mean == pytest.approx((2 * alone[0].mean + 4 * alone[1].mean + 2 * alone[2].mean) / 8, rel=1e-12)
    # One bucket alone: the same noise and values as the plain (dict) eval set of its batch.
    plain = make_eval_set(groups[0], num_timesteps=2, seed=0)
    assert torch.equal(plain["noise"], eval_set[0]["noise"])
    one, listed = evaluate(model, plain, accelerator, 2), evaluate(model, [plain], accelerator, 2)
    assert (one.mean, one.per_t) == (listed.mean, listed.per_t) and one.row() == listed.row()


# ----------------------------------------------------------------------------------------------------- samples

def test_samples_at_the_configured_shape(tmp_path):
    config = typed(_cfg(tmp_path, "train.sample_shape=[5,10,14]"))
    noise = prompt_noise(config.spec, [3, 4], config.train.sample_shape)
    assert noise.shape == (2, 3, 5, 10, 14)
    assert torch.equal(noise[1], prompt_noise(config.spec, [4], (5, 10, 14))[0])  # a prompt's noise: its seed alone
    assert prompt_noise(config.spec, [3]).shape == (1, 3, 4, 16, 16)  # default: the data's shape
    with pytest.raises(Exception, match="train.sample_shape = \\[5, 9, 14\\] must be divisible"):
        typed(_cfg(tmp_path, "train.sample_shape=[5,9,14]"))


# ----------------------------------------------------------------------------------------------------- compile

def test_compiled_blocks_take_one_graph_per_shape_and_equal_eager():
    """train.compile's regional compilation over three alternating shapes (training forward and backward): the
    graphs of the first round are reused (no recompile after it, at most one set per shape), results as eager."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = make()
    model = copy.deepcopy(eager)
    compile_blocks(model, shapes=3, backend=counting)
    per_round = []
    for _ in range(3):
        for shape in SHAPES:
            x, t, text, mask = inputs(shape)
            out = model(x, t, text, mask)
            want = eager(x, t, text, mask)
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
            out.square().mean().backward()
            want.square().mean().backward()
        per_round.append(len(graphs))
    assert per_round == [3, 3, 3]  # one graph per shape (the two blocks share it), reused in later rounds
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(sum(p.grad.sum() for p in model.parameters())))
