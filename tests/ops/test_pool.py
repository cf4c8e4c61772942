"""The Triton tile-mean kernels (one launch for q, k, v; fp32 means) against float64, forward and backward.

The launchers are called directly (the VSA Function is their only caller), every output NaN-poisoned first, on
ops_utils.DEVICE (CUDA when there is one, else the CPU interpreter). No tl.dot here: bf16 runs on both.
"""
import pytest
import torch
from ops_utils import DEVICE, random_inputs, rel_err

from vsa_train.ops import TileLayout, tile_mean
from vsa_train.ops.pool import tile_means_bwd, tile_means_fwd


def tile_means(q, k, v, sizes):
    """(q_c, k_c, v_c), each float32 [B, n, H, D], by the forward launcher with poisoned outputs."""
    return tuple(m.transpose(1, 2) for m in tile_means_fwd(q, k, v, sizes, poison=True).unbind(0))


@pytest.mark.parametrize("video_shape,D,dtype,qk_scale", [
    ((5, 6, 7), 64, torch.float32, 1.0),   # edge tiles of 1..64 real rows
    ((4, 8, 8), 128, torch.float32, 4.0),  # full tiles, x4 inputs
    ((5, 6, 7), 64, torch.float16, 4.0),
    ((1, 13, 2), 64, torch.bfloat16, 1.0),  # no dot in this kernel: bf16 is exact in the interpreter too
])
def test_tile_means_match_float64(video_shape, D, dtype, qk_scale):
    layout = TileLayout(video_shape)
    sizes = layout.kv_tile_sizes(DEVICE)
    x = random_inputs(2, layout.padded_len, 3, D, qk_scale=qk_scale, device=DEVICE)  # pad rows hold random garbage
    inputs = {n: t.to(dtype) for n, t in x.items()}
    means = tile_means(inputs["q"], inputs["k"], inputs["v"], sizes)
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(m.shape, generator=g, dtype=torch.float64).to(DEVICE) for m in means]
    dmeans = torch.stack([c.transpose(1, 2) for c in cotangents]).float()  # [3, B, H, n, D]
    grads = dict(zip("qkv", tile_means_bwd(dmeans, sizes, layout.padded_len, dtype, poison=True)))

    ref_leaves = {n: t.double().requires_grad_() for n, t in inputs.items()}  # same rounded inputs
    refs = [tile_mean(ref_leaves[n], sizes) for n in "qkv"]
    sum((m * c).sum() for m, c in zip(refs, cotangents)).backward()

    real = layout.positions(DEVICE)[1]
    for name, got, ref in zip("qkv", means, refs):
        assert got.dtype == torch.float32 and got.shape == (2, layout.n_tiles, 3, D)
        assert rel_err(got, ref) < 1e-6, name  # fp32 sums of half inputs: no half rounding of the mean
        grad = grads[name]
        assert grad.dtype == dtype and torch.isfinite(grad).all()  # every row written, pad rows too
        assert (grad[:, ~real] == 0).all(), name
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert rel_err(grad, ref_leaves[name].grad) < tol, name


def test_tile_means_ignore_pad_rows_and_take_strided_inputs():
    layout = TileLayout((3, 5, 6))
    sizes = layout.kv_tile_sizes(DEVICE)
    x = random_inputs(1, layout.padded_len, 2, 64, device=DEVICE)
    q, k, v = (t.float().transpose(1, 2).contiguous().transpose(1, 2) for t in x.values())  # [B, S, H, D] strided
    means = tile_means(q, k, v, sizes)
    pad = ~layout.positions(DEVICE)[1]
    q2 = q.clone()
    q2[:, pad] = float("inf")  # unfinite garbage in pad rows is not even read
    assert torch.equal(tile_means(q2, k, v, sizes)[0], means[0])
    assert rel_err(means[2], tile_mean(v.double(), sizes)) < 1e-6


def test_tile_means_bwd_accumulates_in_place():
    """accumulate= adds the pooling gradient to given tensors (the VSA backward's dq, dk, dv) in place."""
    layout = TileLayout((5, 6, 7))
    sizes = layout.kv_tile_sizes(DEVICE)
    g = torch.Generator().manual_seed(2)
    dmeans = torch.randn(3, 2, 3, layout.n_tiles, 64, generator=g).to(DEVICE)
    fresh = tile_means_bwd(dmeans, sizes, layout.padded_len, torch.float32, poison=True)
    base = [torch.randn(2, layout.padded_len, 3, 64, generator=g).to(DEVICE) for _ in range(3)]
    expected = [b + f for b, f in zip(base, fresh)]
    summed = tile_means_bwd(dmeans, sizes, layout.padded_len, torch.float32, accumulate=base)
    for s, b, e in zip(summed, base, expected):
        assert s is b and rel_err(s, e) < 1e-6
    with pytest.raises(ValueError, match="accumulate must be 3 contiguous"):
        tile_means_bwd(dmeans, sizes, layout.padded_len, torch.float16, accumulate=base)
