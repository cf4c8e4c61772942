"""VSA inside the DiT: dense equivalence at the start of adaptation, tile-order path, variants, schedule, init_from."""
import contextlib
import itertools
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from vsa_train import trainer
from vsa_train.checkpoint import init_weights
from vsa_train.metrics import read_metrics
from vsa_train.models import ATTENTION, build_model
from vsa_train.models.vsa import VSAAttention, VSAConfig
from vsa_train.ops import TileLayout, video_sparse_attention

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "test", "hidden_size": 128, "depth": 2, "num_heads": 2}  # head dim 64, as the Triton kernel needs
TEXT_DIM = 16


def make(attn_cfg, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model({**TINY, **overrides}, attn_cfg, in_channels=3, text_dim=TEXT_DIM)
    torch.nn.init.normal_(model.final.linear.weight, std=0.02)  # non-zero outputs
    return model


def inputs(T=4, H=16, W=16, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, T, H, W, generator=g)
    text = torch.randn(B, 5, TEXT_DIM, generator=g)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, torch.rand(B, generator=g), text, mask


def adapted(dense, attn_cfg, tmp_path):
    """A VSA model initialised from the dense model's weights through train.init_from's loader."""
    save_file(dense.state_dict(), str(tmp_path / "dense.safetensors"))
    model = make(attn_cfg, seed=123)  # other random weights: all must come from the file (or be the gates)
    init_weights(model, tmp_path / "dense.safetensors")
    return model


# (T, H, W) pixels -> grids (4, 8, 8): whole tiles; (5, 10, 14) -> (5, 5, 7): edge tiles, padded per layer
@pytest.mark.parametrize("video", [(4, 16, 16), (5, 10, 14)])
@pytest.mark.parametrize("extra", [{}, {"gate_fine": True}, {"dense_layers": [1]}])
def test_adapted_dense_model_starts_exactly_as_dense(tmp_path, video, extra):
    """Ramp at step 0 (all tiles) and G_c = 0: fine attention over all tiles is dense attention over real tokens."""
    dense = make({"name": "dense"})
    vsa_cfg = {"name": "vsa", "schedule": "ramp", "ramp_rate": 0.5, "ramp_interval": 10, **extra}
    vsa = adapted(dense, vsa_cfg, tmp_path)
    vsa.set_sparsity_limit(VSAConfig.from_cfg(vsa_cfg).sparsity_limit(0))
    x, t, text, mask = inputs(*video)
    torch.testing.assert_close(vsa(x, t, text, mask), dense(x, t, text, mask), rtol=1e-5, atol=1e-5)
    vsa.set_sparsity_limit(1.0)  # the target (87.5%): now it is sparse
    assert not torch.allclose(vsa(x, t, text, mask), dense(x, t, text, mask), atol=1e-4)


class RasterVSA(VSAAttention):
    """Reference: VSA per layer on raster-ordered tokens through the public op (permutes in every layer)."""

    def token_order(self, grid, device=None):
        return None

    def forward(self, q, k, v, x, ctx):
        B, S, H, D = q.shape
        gc = self.gate_coarse(x).view(B, S, H, D)
        topk = self.cfg.topk_in_force(TileLayout(ctx.grid, self.cfg.tile).n_tiles, self.limit)
        return video_sparse_attention(q, k, v, ctx.grid, topk, gate_coarse=gc, backend="torch")


@pytest.mark.parametrize("video", [(4, 16, 16), (5, 10, 14)])
def test_tile_order_once_per_forward_matches_per_layer_op(monkeypatch, video):
    """Tokens kept in tile order for the whole network (RoPE following) give the per-layer raster op's output."""
    monkeypatch.setitem(ATTENTION, "raster_vsa", RasterVSA)
    cfg = {"name": "vsa", "topk": 2}
    model, reference = make(cfg), make({**cfg, "name": "raster_vsa"})
    for m in (model, reference):  # non-zero coarse gates, so that the coarse path is exercised too
        for core in (b.attn.core for b in m.blocks):
            torch.nn.init.normal_(core.gate_coarse.weight, std=0.05, generator=torch.Generator().manual_seed(3))
    reference.load_state_dict(model.state_dict())
    x, t, text, mask = inputs(*video)
    ctx = model.context(tuple(n // p for n, p in zip(video, (1, 2, 2))), "cpu")
    first_tile = ctx.positions[: 64 if video == (4, 16, 16) else 16]  # the first tile's tokens come first
    assert (first_tile.max(0).values < 4).all()
    torch.testing.assert_close(model(x, t, text, mask), reference(x, t, text, mask), rtol=1e-5, atol=1e-5)


def test_variants_share_the_kernel_with_other_selections():
    x, t, text, mask = inputs()
    dense = make({"name": "dense"})

    def variant(name, **kw):  # the dense model's weights; the gates (if any) keep their neutral init
        model = make({"name": name, **kw})
        assert set(model.load_state_dict(dense.state_dict(), strict=False).missing_keys) <= {
            n for n, _ in model.named_parameters() if ".gate_" in n}
        return model

    outs = {name: variant(name, topk=1, **kw)(x, t, text, mask) for name, kw in [
        ("vsa", {}), ("vsa_fine_only", {"coarse": False}), ("vsa_coarse_only", {"fine": False, "gate_coarse": False}),
        ("tile_window", {"select": "window", "coarse": False, "window": [0, 0, 0]}),
    ]}
    # A fresh VSA model has G_c = 0: its output is the fine-only variant's, and differs from coarse-only.
    torch.testing.assert_close(outs["vsa"], outs["vsa_fine_only"])
    assert not torch.allclose(outs["vsa_coarse_only"], outs["vsa"], atol=1e-4)
    # Window 0 = each tile attends to itself; top-1 by coarse score picks another tile for some query tiles.
    assert not torch.allclose(outs["tile_window"], outs["vsa"], atol=1e-4)
    # A window covering the whole grid is dense attention.
    window = variant("tile_window", select="window", coarse=False, window=[1, 1, 1])
    torch.testing.assert_close(window(x, t, text, mask), dense(x, t, text, mask), rtol=1e-5, atol=1e-5)


def test_coarse_only_output_is_constant_within_a_tile():
    core = VSAAttention({"name": "vsa_coarse_only", "fine": False, "gate_coarse": False}, dim=128, num_heads=2)
    model = make({"name": "dense"})
    ctx = model.context((4, 8, 8), "cpu")
    ctx.order = core.token_order((4, 8, 8))
    q, k, v = torch.randn(3, 1, 256, 2, 64).unbind(0)
    out = core(q, k, v, torch.randn(1, 256, 128), ctx).view(1, 4, 64, 2, 64)  # [B, tiles, 64, H, D]
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))


def test_schedule_and_topk_rule():
    vsa = VSAConfig.from_cfg({"name": "vsa"})
    assert vsa.topk_in_force(256) == 32 and vsa.topk_in_force(4) == 1  # round(0.125 * tiles), at least 1
    assert vsa.sparsity_limit(10**6) == 1.0  # constant: the target from the first step
    ramp = VSAConfig.from_cfg({"name": "vsa", "schedule": "ramp", "ramp_rate": 0.25, "ramp_interval": 10})
    assert [ramp.topk_in_force(256, ramp.sparsity_limit(s)) for s in (0, 9, 10, 25, 30, 40, 1000)] == [
        256, 256, 192, 128, 64, 32, 32]
    direct = VSAConfig.from_cfg({"name": "vsa", "topk": 7, "schedule": "ramp", "ramp_rate": 0.5, "ramp_interval": 1})
    assert [direct.topk_in_force(256, direct.sparsity_limit(s)) for s in (0, 1, 2)] == [256, 128, 7]
    window = VSAConfig.from_cfg({"name": "tile_window", "select": "window", "coarse": False})
    layout = TileLayout((5, 5, 7))  # edge tiles: count real key tokens per query token by brute force
    coords = torch.div(torch.cartesian_prod(*map(torch.arange, (5, 5, 7))), 4, rounding_mode="floor")  # tile of each
    near = ((coords[:, None] - coords[None]).abs() <= 1).all(-1)  # [S, S]
    assert window.keys_per_query(layout.video_shape, 1) == pytest.approx(near.sum().item() / layout.seq_len)


def test_bad_vsa_configs_fail_clearly():
    with pytest.raises(ValueError, match="unknown key attn.sparsty; did you mean attn.sparsity"):
        make({"name": "vsa", "sparsty": 0.9})
    with pytest.raises(ValueError, match="attn.sparsity"):
        make({"name": "vsa", "sparsity": 1.0})
    with pytest.raises(ValueError, match="attn.schedule"):
        make({"name": "vsa", "schedule": "cosine"})
    with pytest.raises(ValueError, match="no coarse stage"):
        make({"name": "tile_window", "select": "window"})
    with pytest.raises(ValueError, match="dense_layers"):
        make({"name": "vsa", "dense_layers": [2]})
    vsa = make({"name": "vsa"})
    with pytest.raises(ValueError, match="unexpected.*gate_coarse"):  # a VSA checkpoint into a dense model
        dense = make({"name": "dense"})
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vsa_{os.getpid()}.safetensors"
        save_file(vsa.state_dict(), str(path))
        try:
            init_weights(dense, path)
        finally:
            path.unlink()
    with pytest.raises(FileNotFoundError, match="init_from"):
        init_weights(vsa, "/nonexistent/run")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no Triton")
def test_triton_backend_model_forward():
    """A tiny forward through the Triton kernels (interpreter on CPU, fp32) equals the PyTorch backend, with grad
    (training) and without (eval)."""
    x, t, text, mask = inputs(T=4, H=8, W=16, B=1)  # grid (4, 4, 8): 2 tiles
    models = [make({"name": "vsa", "topk": 1, "backend": b}, depth=1) for b in ("torch", "triton")]
    torch.testing.assert_close(models[1](x, t, text, mask), models[0](x, t, text, mask), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(models[1](x, t, text, mask), models[0](x, t, text, mask), rtol=1e-4, atol=1e-4)


def _cfg(run_dir, *overrides):
    tiny = ["data.frames=4", "data.height=16", "data.width=16", "train.batch_size=2", "train.eval_samples=2",
            "train.eval_timesteps=2", "train.log_every=1", "logger=none"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[*tiny, f"run_dir={run_dir}", *overrides])


def test_dense_run_switched_to_vsa_with_ramp(tmp_path):
    """train.init_from: the VSA run's step-0 eval loss is the dense run's last; topk ramps and is logged."""
    dense_dir, vsa_dir = tmp_path / "dense", tmp_path / "vsa"
    trainer.train(_cfg(dense_dir, "train.max_steps=2", "train.eval_every=2"))
    trainer.train(_cfg(vsa_dir, "attn=vsa", "attn.schedule=ramp", "attn.ramp_rate=0.5", "attn.ramp_interval=1",
                       "train.max_steps=3", "train.eval_every=100", f"train.init_from={dense_dir}"))
    dense_rows, rows = read_metrics(dense_dir / "metrics.jsonl"), read_metrics(vsa_dir / "metrics.jsonl")
    assert rows[0]["step"] == 0  # weights only: the step (and optimizer) start afresh
    assert rows[0]["eval/loss"] == pytest.approx(dense_rows[-1]["eval/loss"], rel=1e-5)
    assert [r["topk"] for r in rows] == [4, 4, 2, 1]  # 4 tiles, target round(0.125 * 4) -> 1
    per_step = [b["flops"] - a["flops"] for a, b in itertools.pairwise(rows[1:])]
    assert per_step[0] > per_step[1]  # executed FLOPs follow the topk in force...
    assert rows[-1]["flops_dense"] == pytest.approx(1.5 * dense_rows[-1]["flops"])  # ...dense-equivalent beside


def test_compile_fullgraph_follows_the_schedule():
    """No graph breaks (tile order, layout tables, op); a new topk in force is picked up (by a recompile)."""
    model = make({"name": "vsa", "schedule": "ramp"}).eval()
    x, t, text, mask = inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for limit in (0.0, 1.0):
            model.set_sparsity_limit(limit)
            torch.testing.assert_close(compiled(x, t, text, mask), model(x, t, text, mask))


def test_mixed_dtypes_under_autocast_take_the_autocast_dtype():
    """On CUDA, autocast runs RMSNorm in fp32 but linears in bf16: the core must hand the op one dtype."""
    core = VSAAttention({"name": "vsa", "topk": 1}, dim=128, num_heads=2)
    ctx = make({"name": "vsa"}).context((4, 8, 8), "cpu")
    q, k = torch.randn(2, 1, 256, 2, 64).unbind(0)  # fp32, as RMSNorm returns under CUDA autocast
    v, x = torch.randn(1, 256, 2, 64, dtype=torch.bfloat16), torch.randn(1, 256, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = core(q, k, v, x, ctx)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    assert core(q, k, v, x, ctx).dtype == torch.float32  # without autocast: q's dtype


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no Triton")
def test_triton_eager_path_trains_under_autocast():
    """The trainer runs the forward under autocast and the backward outside it: the eager Triton Function must
    keep its coarse stage in fp32 (a bf16 matmul there made its backward fail on dtypes). fp16 on the CPU: the
    interpreter's bf16 dots are wrong (but would not crash)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    model = make({"name": "vsa", "topk": 1, "backend": "triton"}, depth=1).to(device)
    x, t, text, mask = (a.to(device) for a in inputs(T=4, H=8, W=16, B=1))
    with torch.autocast(device, dtype=dtype):
        out = model(x, t, text, mask)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


class _LaunchRecorder:
    """Records each interpreted Triton launch as what its compile depends on: kernel, constexpr and config kwargs,
    tensor dtypes, and which stride arguments are divisible by 16 (Triton specialises on that, not on sizes)."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction

        self.launches = set()
        run = InterpretedFunction.run

        def recording_run(fn, *args, grid, warmup, **kwargs):
            named = dict(zip(fn.arg_names, args))
            self.launches.add((
                fn.fn.__name__,
                tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))),
                tuple(str(v.dtype) for v in args if isinstance(v, torch.Tensor)),
                tuple(v % 16 == 0 for k, v in named.items() if k.startswith("stride")),
            ))
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", recording_run)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches in the Triton interpreter")
@pytest.mark.parametrize("attn", [{"name": "vsa", "topk": 3}, {"name": "tile_window", "select": "window",
                                                                "coarse": False}])
def test_kernel_warm_up_launches_what_a_model_launches(monkeypatch, attn):
    """ops.vsa.warm_up (one head, 4 tiles) compiles exactly the kernels a VSA DiT launches at another size (here 2
    heads, 16 tiles, 2 videos): same kernels, constexprs, dtypes, stride divisibility. grad=True: what a compiled
    training step launches; grad=False: an eval's forward (eager, no gradient); op=False: the variants' fine stage.
    So the model finds them compiled (on a GPU: one compiled variant per kernel, docs/benchmarks.md)."""
    from vsa_train.ops.vsa import warm_up

    recorder = _LaunchRecorder(monkeypatch)
    model = make({**attn, "backend": "triton"}, depth=1)
    x, t, text, mask = inputs(T=4, H=16, W=32)
    with torch.no_grad():
        model.eval()(x, t, text, mask)
    eval_launches, recorder.launches = recorder.launches, set()
    compiled = torch.compile(model.train(), backend="aot_eager", fullgraph=True)
    compiled(x, t, text, mask).square().mean().backward()
    train_launches, recorder.launches = recorder.launches, set()
    op = attn["name"] == "vsa"
    rng = torch.get_rng_state()
    assert warm_up(64, torch.float32, "cpu", gate_coarse=True, gate_fine=False, op=op, grad=False) is None
    assert recorder.launches == eval_launches
    recorder.launches = set()
    warm_up(64, torch.float32, "cpu", gate_coarse=True, gate_fine=False, op=op, grad=True).backward()
    assert recorder.launches == train_launches
    assert torch.equal(torch.get_rng_state(), rng)  # it runs beside training: the global RNG is the training's
    kernels = {launch[0] for launch in train_launches}
    assert {"block_sparse_fwd_kernel", "block_sparse_bwd_dq_kernel", "block_sparse_bwd_dkv_kernel",
            "mark_selected_kernel"} <= kernels
    assert op == ("tile_means_fwd_kernel" in kernels and "gated_combine_bwd_kernel" in kernels)


def test_kernel_warm_up_thread_takes_each_sparse_layer_kind_once(monkeypatch):
    """One warm-up per (head dim, op or fine stage, gates) of the Triton-backed sparse layers, in a thread: every
    eval forward first, then forward and backward, the backward in that thread; a failure only warns."""
    from vsa_train.models import vsa as vsa_model

    calls = []

    def warm_up(*args, grad, **kwargs):
        calls.append((*args, {**kwargs, "grad": grad}))
        # Its backward runs in this thread, not on the autograd engine's device threads.
        assert not torch._C._is_multithreading_enabled()
        return torch.zeros((), requires_grad=True) if grad else None  # what the backward starts from

    monkeypatch.setattr(vsa_model, "warm_up", warm_up)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    cuda = torch.device("cuda")
    model = make({"name": "vsa", "dense_layers": [0], "gate_fine": True}, depth=3)
    model.blocks[2].attn.core = VSAAttention({"name": "tile_window", "select": "window", "coarse": False}, 128, 2)
    vsa_model.warm_up_kernels(model, torch.bfloat16, cuda).join()
    assert calls == [(64, torch.bfloat16, cuda, False, False, {"op": False, "grad": False}),
                     (64, torch.bfloat16, cuda, True, True, {"op": True, "grad": False}),
                     (64, torch.bfloat16, cuda, False, False, {"op": False, "grad": True}),
                     (64, torch.bfloat16, cuda, True, True, {"op": True, "grad": True})]
    # Nothing to compile: no GPU, only dense or torch-backed layers, no fine stage.
    assert vsa_model.warm_up_kernels(model, torch.bfloat16, torch.device("cpu")) is None
    for attn in ({"name": "dense"}, {"name": "vsa", "backend": "torch"}, {"name": "vsa_coarse_only", "fine": False}):
        assert vsa_model.warm_up_kernels(make(attn), torch.bfloat16, cuda) is None, attn

    def fail(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(vsa_model, "warm_up", fail)
    with pytest.warns(UserWarning, match="VSA kernel warm-up failed .*no compiler.*first use"):
        vsa_model.warm_up_kernels(model, torch.bfloat16, cuda).join()
