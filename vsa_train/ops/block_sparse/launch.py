"""Launchers of the block-sparse Triton kernels (fwd.py, bwd.py): config choice, strides, outputs, grids.

The tile pairing (two 64-row tiles per loop iteration) and NaN-poisoned outputs come in as arguments
(KernelOptions, launch.py); the autograd Function and the registered ops around these are in function.py.
"""
import torch

from ..launch import BLOCK, device_guard, new_output
from . import configs
from .bwd import (
    block_sparse_bwd_dkv_kernel,
    block_sparse_bwd_dq_kernel,
    block_sparse_bwd_preprocess_kernel,
)
from .fwd import block_sparse_fwd_kernel


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay fp32 in the matrix units ("ieee", not tf32); 16-bit inputs ignore this setting.
    return "ieee" if dtype == torch.float32 else "tf32"


# Config launched per (kernel, head dim, dtype, tile pairing): configs.py's default, or the autotuner's pick under
# VSA_AUTOTUNE=full. Later launches skip the autotuner's per-call key building.
_TUNED: dict = {}


def launch_tuned(kernel, grid, key, default, *args, **kwargs):
    """kernel[grid](*args, **kwargs) for a @triton.autotune kernel with config default(pair) (configs.py), or, under
    VSA_AUTOTUNE=full, the autotuner's pick (it searches on the first launch per key). key = (head dim, dtype, pair)
    fixes the autotune key; the config is chosen once per key, off the per-call path."""
    config = _TUNED.get((kernel, key))
    if config is None and configs.full_search():
        kernel[grid](*args, **kwargs)
        _TUNED[(kernel, key)] = kernel.best_config
        return
    if config is None:
        config = _TUNED[(kernel, key)] = default(key[2])
    kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


def key_shift(k: torch.Tensor, kv_tile_sizes: torch.Tensor) -> torch.Tensor:
    """fp32 [B, H, D] contiguous: the mean of k's real rows per (batch, head); pad rows are left out.

    One matrix-vector product with weights real / n_real in k's dtype; no host synchronisation. Only its
    conditioning matters, not its exactness: dQ is exact for any shift.
    """
    B, S, H, D = k.shape
    real = (torch.arange(BLOCK, device=k.device) < kv_tile_sizes[:, None]).reshape(-1)  # [S]
    weights = (real.to(torch.float32) / kv_tile_sizes.sum().to(torch.float32)).to(k.dtype)  # [S]
    mean = torch.matmul(weights, k.reshape(B, S, H * D))  # [B, H * D]
    return mean.view(B, H, D).to(torch.float32).contiguous()


def key_shift_from_tile_means(k_means: torch.Tensor, kv_tile_sizes: torch.Tensor) -> torch.Tensor:
    """fp32 [B, H, D] contiguous: key_shift from the fp32 tile means [B, H, n, D] of the VSA pooling (no pass over K)."""
    sizes = kv_tile_sizes.to(torch.float32)  # [n]
    return (torch.matmul(sizes, k_means) / sizes.sum()).contiguous()  # [B, H, D]


def block_sparse_fwd_triton(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale: float, pair: bool,
                            poison: bool = False):
    """Launch the forward kernel. Returns out [B, S, H, D] (contiguous, q's dtype) and lse [B, H, S] fp32.

    pair: two tiles per loop iteration (KernelOptions.pairs); poison: NaN-filled outputs.
    """
    B, S, H, D = q.shape
    n_tiles = S // BLOCK
    out = new_output((B, S, H, D), q.dtype, q.device, poison)
    lse = new_output((B, H, S), torch.float32, q.device, poison)
    q2k_index, q2k_count = q2k_index.contiguous(), q2k_count.contiguous()
    with device_guard(q):
        launch_tuned(
            block_sparse_fwd_kernel, (n_tiles, B * H), (D, q.dtype, pair), configs.fwd_default,
            q, k, v, out, lse, q2k_index, q2k_count, kv_tile_sizes.contiguous(),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, n_tiles, q2k_index.shape[-1], scale,
            HEAD_DIM=D, BLOCK=BLOCK, DOT_PRECISION=_dot_precision(q.dtype), PAIR=pair,
        )
    return out, lse


def block_sparse_bwd_triton(do, dlse, q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles,
                            kv_tile_sizes, scale: float, shift, pair: bool, poison: bool = False):
    """Launch delta preprocess, dQ and dK/dV kernels. Returns dq, dk, dv ([B, S, H, D], contiguous).

    shift: None, or fp32 [B, H, D] (key_shift): the dQ kernel computes dS @ (K - shift) as dS @ K - rowsum(dS) shift
    (KernelOptions.center_keys). Any shift gives the exact dQ; it is a constant to autograd (dK, dV and the forward
    do not use it). pair, poison: as the forward.
    """
    B, S, H, D = q.shape
    dlse = dlse.contiguous() if dlse is not None else None
    n_tiles = S // BLOCK
    grid = (n_tiles, B * H)
    precision = _dot_precision(q.dtype)
    sizes = kv_tile_sizes.contiguous()
    delta = new_output((B, H, S), torch.float32, q.device, poison)
    dq = new_output((B, S, H, D), q.dtype, q.device, poison)
    dk = new_output((B, S, H, D), k.dtype, q.device, poison)
    dv = new_output((B, S, H, D), v.dtype, q.device, poison)
    with device_guard(q):
        block_sparse_bwd_preprocess_kernel[grid](
            out, do, dlse if dlse is not None else delta, delta,
            *out.stride(), *do.stride(), H, S,
            HEAD_DIM=D, BLOCK=BLOCK, HAS_DLSE=dlse is not None,
        )
        launch_tuned(
            block_sparse_bwd_dq_kernel, grid, (D, q.dtype, pair), configs.bwd_default,
            q, k, v, do, dq, lse, delta, q2k_index.contiguous(), q2k_count.contiguous(), sizes,
            shift.contiguous() if shift is not None else delta, dlse if dlse is not None else delta,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, n_tiles, q2k_index.shape[-1], scale,
            HEAD_DIM=D, BLOCK=BLOCK, DOT_PRECISION=precision, HAS_SHIFT=shift is not None, HAS_DLSE=dlse is not None,
            PAIR=pair,
        )
        launch_tuned(
            block_sparse_bwd_dkv_kernel, grid, (D, q.dtype, pair), configs.bwd_default,
            q, k, v, do, dk, dv, lse, delta, k2q_offsets.contiguous(), k2q_q_tiles.contiguous(), sizes,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            H, n_tiles, k2q_q_tiles.shape[-1], scale,
            HEAD_DIM=D, BLOCK=BLOCK, DOT_PRECISION=precision, PAIR=pair,
        )
    return dq, dk, dv
