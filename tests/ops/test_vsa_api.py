"""The public VSA op: raster and tile-order paths, gates, dtypes, other tiles, the Triton backend, clear errors."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ops_utils import BF16_DOT, DEVICE, DOT_DTYPES, POISON, TOL, output_and_grads, random_inputs, rel_err

from vsa_train.ops import (
    TileLayout,
    naive_video_sparse_attention,
    video_sparse_attention,
    video_sparse_attention_tiled,
)

B, H, D = 2, 2, 64
NAMES = ("q", "k", "v", "gate_coarse", "gate_fine")


def test_tiled_path_equals_raster_path():
    layout = TileLayout((5, 6, 7))
    x = random_inputs(B, layout.seq_len, H, D, NAMES)
    out = video_sparse_attention(**x, video_shape=layout.video_shape, topk=3)
    tiled = {n: layout.to_tiles(t) for n, t in x.items()}
    # A model keeping tokens in tile order may carry anything finite in the pad rows.
    pad = ~layout.positions()[1]
    for t in tiled.values():
        t[:, pad] = torch.randn_like(t[:, pad]) * 100
    out_tiled = video_sparse_attention_tiled(**tiled, layout=layout, topk=3)
    assert out_tiled.shape == (B, layout.padded_len, H, D)
    assert rel_err(layout.from_tiles(out_tiled), out) < 1e-14


def test_missing_gates_are_ones():
    video_shape = (4, 8, 8)
    x = random_inputs(B, math.prod(video_shape), H, D)
    ones = torch.ones_like(x["q"])
    out = video_sparse_attention(**x, video_shape=video_shape, topk=2)
    assert torch.allclose(out, video_sparse_attention(**x, video_shape=video_shape, topk=2,
                                                      gate_coarse=ones, gate_fine=ones), rtol=0, atol=1e-14)
    only_fine = video_sparse_attention(**x, video_shape=video_shape, topk=2, gate_coarse=0 * ones)
    assert rel_err(only_fine, out) > 0.05  # the coarse branch contributes


@pytest.mark.parametrize("video_shape,tile", [((4, 8, 8), (2, 4, 4)), ((5, 6, 7), (1, 2, 3))])
def test_other_tiles_with_torch_backend(video_shape, tile):
    x = random_inputs(B, math.prod(video_shape), H, 16, NAMES)

    def run(impl):
        return lambda **t: impl(video_shape=video_shape, topk=3, tile=tile, **t)

    out, grads = output_and_grads(run(video_sparse_attention), x, torch.float64)
    ref, ref_grads = output_and_grads(run(naive_video_sparse_attention), x, torch.float64)
    assert rel_err(out, ref) < 1e-12
    for name in NAMES:
        assert rel_err(grads[name], ref_grads[name]) < 1e-12, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_torch_backend(dtype):
    video_shape = (4, 8, 8)
    x = random_inputs(B, math.prod(video_shape), H, D, NAMES)

    def run(impl):
        return lambda **t: impl(video_shape=video_shape, topk=2, **t)

    out, grads = output_and_grads(run(video_sparse_attention), x, dtype)
    ref, ref_grads = output_and_grads(run(naive_video_sparse_attention), {n: t.to(dtype) for n, t in x.items()},
                                      torch.float64)
    assert out.dtype == dtype
    assert rel_err(out, ref) < 1e-2
    for name in NAMES:
        assert rel_err(grads[name], ref_grads[name]) < 1e-2, name


def _triton_backend_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _triton_backend_available(),
                    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before triton is imported")
@pytest.mark.parametrize("qk_scale", [1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16_DOT)])
def test_triton_backend_matches_naive(qk_scale, dtype):
    video_shape = (5, 6, 7)
    x = random_inputs(1, math.prod(video_shape), H, D, NAMES, qk_scale, device=DEVICE)

    def run(impl, **kw):
        return lambda **t: impl(video_shape=video_shape, topk=3, **kw, **t)

    out, grads = output_and_grads(run(video_sparse_attention, backend="triton", options=POISON), x, dtype)
    # The float64 reference sees exactly the rounded inputs the kernels see (and selects from their means).
    ref, ref_grads = output_and_grads(run(naive_video_sparse_attention), {n: t.to(dtype) for n, t in x.items()},
                                      torch.float64)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    for name in NAMES:
        assert rel_err(grads[name], ref_grads[name]) < TOL[dtype], name


S = 256  # tokens of the default (4, 8, 8) video in _call


def _call(video_shape=(4, 8, 8), topk=2, backend="auto", tile=(4, 4, 4), D=D, **overrides):
    """video_sparse_attention on valid float64 inputs of S tokens, with some arguments replaced. With
    backend="triton" the tensors go to DEVICE, so that those cases reach the checks they test (CPU tensors
    without the interpreter are refused before them)."""
    x = random_inputs(1, S, H, D)
    x.update(overrides)
    if backend == "triton":
        x = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in x.items()}
    return video_sparse_attention(x["q"], x["k"], x["v"], video_shape, topk, tile=tile, backend=backend,
                                  gate_coarse=x.get("gate_coarse"), gate_fine=x.get("gate_fine"))


ERRORS = [
    ({"q": torch.zeros(1, S, H * D)}, ValueError, r"q must be \[B, S, H, D\] \(4 dims\)"),
    ({"q": torch.zeros(1, S, H, D, dtype=torch.int64)}, TypeError, "q must be bfloat16, float16, float32 or float64"),
    ({"q": "q"}, TypeError, "q must be a torch.Tensor"),
    ({"video_shape": (4, 8, 7)}, ValueError, r"q has 256 tokens but video_shape=\(4, 8, 7\).*S = T \* H \* W = 224"),
    ({"video_shape": (4, 8)}, ValueError, "video_shape must be 3 positive ints"),
    ({"k": torch.zeros(1, S, H, 32, dtype=torch.float64)}, ValueError, "k must have q's shape"),
    ({"v": torch.zeros(1, S, H, D, dtype=torch.float32)}, TypeError, "v must have q's dtype torch.float64"),
    ({"k": torch.zeros(1, S, H, D, dtype=torch.float64, device="meta")}, ValueError, "k must be on q's device cpu"),
    ({"gate_coarse": torch.zeros(1, S, 1, D, dtype=torch.float64)}, ValueError, "gate_coarse must have q's shape"),
    ({"gate_fine": torch.zeros(1, S, H, D)}, TypeError, "gate_fine must have q's dtype"),
    ({"gate_fine": 1.0}, TypeError, "gate_fine must be a torch.Tensor or None"),
    ({"topk": 0}, ValueError, r"topk must be >= 1"),
    ({"topk": 2.0}, TypeError, "topk must be an int"),
    ({"backend": "cuda"}, ValueError, r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    ({"backend": "triton", "D": 32}, ValueError, r"backend='triton' supports head dims \(64, 128\), got D=32"),
    ({"backend": "triton"}, TypeError, "backend='triton' supports bf16/fp16/fp32, got torch.float64"),
    ({"backend": "triton", "tile": (2, 4, 4),
      "q": torch.zeros(1, S, H, D), "k": torch.zeros(1, S, H, D), "v": torch.zeros(1, S, H, D)},
     ValueError, r"backend='triton' needs prod\(tile\) == 64, got tile=\(2, 4, 4\)"),
]


@pytest.mark.parametrize("kwargs,error,match", ERRORS)
def test_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
import torch
from vsa_train.ops import block_sparse_attention, video_sparse_attention
x = torch.randn(4, 1, 256, 1, 64).unbind(0)
out = video_sparse_attention(*x[:3], video_shape=(4, 8, 8), topk=2, gate_coarse=x[3])  # auto: PyTorch on CPU
print("torch backend", tuple(out.shape))
for op in (lambda: video_sparse_attention(*x[:3], video_shape=(4, 8, 8), topk=2, backend="triton"),
           lambda: block_sparse_attention(*x[:3], torch.zeros(1, 1, 4, 1, dtype=torch.int32),
                                          torch.ones(1, 1, 4, dtype=torch.int32),
                                          torch.full((4,), 64, dtype=torch.int32), backend="triton")):
    try:
        op()
    except RuntimeError as e:
        print(e)
"""


def test_without_triton_the_torch_backend_runs_and_triton_says_how_to_get_it():
    """triton is optional (pyproject.toml): without it the package imports, "auto" runs PyTorch on CPU, and
    backend="triton" is one line saying `pip install triton`."""
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    why = "block_sparse_attention: backend='triton' needs the triton package, which is not installed: " \
          "`pip install triton` (torch's CUDA build brings it); or use backend='torch'"
    assert proc.stdout.splitlines() == ["torch backend (1, 256, 1, 64)", why, why]


@pytest.mark.skipif(not _triton_backend_available(),
                    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before triton is imported")
def test_options_must_be_kernel_options():
    x = {n: t.float() for n, t in random_inputs(1, S, H, D, device=DEVICE).items()}
    with pytest.raises(TypeError, match="options must be a KernelOptions or None, got dict"):
        video_sparse_attention(**x, video_shape=(4, 8, 8), topk=2, backend="triton", options={"center_keys": False})


def test_tiled_clear_errors():
    layout = TileLayout((5, 6, 7))
    x = random_inputs(1, layout.seq_len, H, D)  # raster length, not padded
    with pytest.raises(ValueError, match=r"q has 210 tokens .* needs S_pad = n_tiles \* prod\(tile\) = 512"):
        video_sparse_attention_tiled(**x, layout=layout, topk=2)
    with pytest.raises(TypeError, match="layout must be a TileLayout"):
        video_sparse_attention_tiled(**x, layout=(5, 6, 7), topk=2)


def test_compiles_without_graph_breaks():
    layout = TileLayout((5, 6, 7))
    x = {n: t.float() for n, t in random_inputs(1, layout.seq_len, H, D, NAMES).items()}
    eager, eager_grads = output_and_grads(lambda **t: video_sparse_attention(**t, video_shape=(5, 6, 7), topk=3),
                                          x, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(video_sparse_attention, backend="aot_eager", fullgraph=True)
    out, grads = output_and_grads(lambda **t: compiled(**t, video_shape=(5, 6, 7), topk=3), x, torch.float32)
    assert rel_err(out, eager) < 1e-6
    for name in NAMES:
        assert rel_err(grads[name], eager_grads[name]) < 1e-6, name


@pytest.mark.skipif(not _triton_backend_available(),
                    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before triton is imported")
def test_triton_tiled_path_and_compile():
    """Triton backend: the tile-order path equals the raster path; the op compiles into one graph."""
    layout = TileLayout((3, 5, 6))  # 4 tiles, all edge tiles
    x = {n: t.float() for n, t in random_inputs(1, layout.seq_len, 1, D, NAMES, seed=3, device=DEVICE).items()}

    def raster(**t):
        return video_sparse_attention(**t, video_shape=layout.video_shape, topk=2, backend="triton", options=POISON)

    out, grads = output_and_grads(raster, x, torch.float32)
    tiled, tiled_grads = output_and_grads(
        lambda **t: layout.from_tiles(video_sparse_attention_tiled(
            **{n: layout.to_tiles(v) for n, v in t.items()}, layout=layout, topk=2, backend="triton", options=POISON)),
        x, torch.float32)
    assert rel_err(tiled, out) < 1e-6
    for name in NAMES:
        assert rel_err(tiled_grads[name], grads[name]) < 1e-6, name

    torch._dynamo.reset()
    compiled = torch.compile(raster, backend="aot_eager", fullgraph=True)
    out_c, grads_c = output_and_grads(compiled, x, torch.float32)
    assert torch.equal(out_c, out)
    for name in NAMES:
        assert torch.equal(grads_c[name], grads[name]), name


@pytest.mark.skipif(not _triton_backend_available(),
                    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before triton is imported")
@pytest.mark.parametrize("path", ["raster", "tiled"])
@pytest.mark.parametrize("gates", [NAMES[3:], NAMES[3:4], ()])
def test_compiled_equals_eager(path, gates):
    """Eager mode and torch.compile run one autograd Function (compiled: its bodies as opaque registered ops):
    bitwise equal outputs and gradients, for every set of gates, with outputs NaN-poisoned."""
    layout = TileLayout((3, 5, 9))  # 6 tiles, edge tiles among them
    x = random_inputs(2, layout.seq_len, 2, D, NAMES[:3] + gates, seed=5, device=DEVICE)
    if path == "tiled":
        x = {n: layout.to_tiles(t) for n, t in x.items()}

    def op(**t):
        if path == "tiled":
            return video_sparse_attention_tiled(**t, layout=layout, topk=2, backend="triton", options=POISON)
        return video_sparse_attention(**t, video_shape=layout.video_shape, topk=2, backend="triton", options=POISON)

    torch._dynamo.reset()
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    # fp16 too: the interpreter's fp16 dot is sound; bf16 on CUDA only (the interpreter's bf16 dot is not).
    for dtype in DOT_DTYPES:
        out, grads = output_and_grads(op, x, dtype)
        ref, ref_grads = output_and_grads(compiled, x, dtype)
        assert torch.equal(out, ref) and torch.isfinite(out).all()
        for name in x:
            assert grads[name].dtype == dtype and torch.equal(grads[name], ref_grads[name]), name
        with torch.no_grad():  # inference: no key->query index is built, same output
            assert torch.equal(op(**{n: t.to(dtype) for n, t in x.items()}), out)


@pytest.mark.skipif(not _triton_backend_available(),
                    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before triton is imported")
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck(need_grad):
    """The registered forward and backward ops (what torch.compile sees): schema and fake shapes match the real ones."""
    from vsa_train.ops.vsa_function import vsa_bwd_op, vsa_fwd_op

    layout = TileLayout((4, 4, 5))
    x = [t.float() for t in random_inputs(1, layout.padded_len, 2, D, NAMES[:4], device=DEVICE).values()]
    x[3] = x[3][:, :layout.seq_len]  # the gate is in raster order, like the output
    args = (*x, None, layout.kv_tile_sizes(DEVICE), layout.raster_tokens(DEVICE), layout.seq_len, 2, need_grad, True,
            False)
    torch.library.opcheck(vsa_fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    if need_grad:
        out, *saved = vsa_fwd_op(*args)
        bwd_args = (torch.randn_like(out), *args[:7], *saved, True, True, False)
        torch.library.opcheck(vsa_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))
