"""The Triton combine kernels (O = O_c * G_c + O_f * G_f, tile or raster order out) against float64 PyTorch.

The launchers are called directly (the VSA Function is their only caller), every output NaN-poisoned first, on
ops_utils.DEVICE (CUDA when there is one, else the CPU interpreter). No tl.dot here: bf16 runs on both.
"""
import pytest
import torch
from ops_utils import DEVICE, random_inputs, rel_err

from vsa_train.ops import TileLayout, combine
from vsa_train.ops.gating import gated_combine_bwd, gated_combine_fwd


def reference(o_coarse, o_fine, gate_coarse, gate_fine, layout, raster):
    """float64 combine in tile order (gates tiled first, O untiled after when raster)."""
    if raster:
        gate_coarse, gate_fine = (None if g is None else layout.to_tiles(g) for g in (gate_coarse, gate_fine))
    out = combine(o_coarse, o_fine, gate_coarse, gate_fine)
    return layout.from_tiles(out) if raster else out


@pytest.mark.parametrize("video_shape,D,dtype,scale,gates,raster", [
    ((5, 6, 7), 64, torch.float32, 1.0, "both", True),    # edge tiles, raster order
    ((5, 6, 7), 64, torch.float32, 4.0, "both", False),   # tile order, x4 inputs
    ((4, 8, 8), 128, torch.float16, 1.0, "coarse", True),
    ((1, 13, 2), 64, torch.bfloat16, 4.0, "fine", True),  # no dot in this kernel: bf16 is fine in the interpreter
    ((4, 4, 8), 64, torch.float32, 1.0, "none", False),
])
def test_gated_combine_matches_float64(video_shape, D, dtype, scale, gates, raster):
    layout = TileLayout(video_shape)
    B, H, S = 2, 3, layout.seq_len if raster else layout.padded_len
    g = torch.Generator().manual_seed(0)
    o_coarse = torch.randn(B, H, layout.n_tiles, D, generator=g, dtype=torch.float64).transpose(1, 2) * scale
    o_fine = torch.randn(B, layout.padded_len, H, D, generator=g, dtype=torch.float64) * scale
    o_coarse, o_fine = o_coarse.to(DEVICE), o_fine.to(DEVICE)  # strides kept: o_coarse stays [B, H, n, D] storage
    x = random_inputs(B, S, H, D, ("gate_coarse", "gate_fine"), seed=2, device=DEVICE)
    x = {n: x[n] * scale if gates in ("both", n.split("_")[1]) else None for n in x}
    inputs = {"o_coarse": o_coarse.float(), "o_fine": o_fine.to(dtype),
              **{n: None if t is None else t.to(dtype) for n, t in x.items()}}
    tokens = layout.raster_tokens(DEVICE) if raster else None
    args = (inputs["o_coarse"], inputs["o_fine"], inputs["gate_coarse"], inputs["gate_fine"], tokens)
    out = gated_combine_fwd(*args, S, poison=True)
    assert out.dtype == dtype and out.shape == (B, S, H, D)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    grads = dict(zip(inputs, gated_combine_bwd(cot.to(dtype), *args, poison=True)))

    ref_leaves = {n: None if t is None else t.detach().double().requires_grad_() for n, t in inputs.items()}
    ref = reference(**ref_leaves, layout=layout, raster=raster)
    (ref * cot).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    real = layout.positions(DEVICE)[1]
    # Tile order: the output's pad rows are computed too (unspecified for callers); compare the real rows.
    keep = slice(None) if raster else real
    assert rel_err(out[:, keep], ref[:, keep]) < tol
    for name, x in inputs.items():
        if x is None:
            assert grads[name].numel() == 0, name
            continue
        grad = grads[name]
        assert grad.dtype == x.dtype and torch.isfinite(grad).all(), name  # every element written
        assert rel_err(grad, ref_leaves[name].grad) < tol, name
    if raster:  # pad rows of the fine output get no gradient
        assert (grads["o_fine"][:, ~real] == 0).all()
