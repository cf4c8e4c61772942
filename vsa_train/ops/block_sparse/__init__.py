"""Block-sparse attention over 64-token tiles: the fine stage of VSA (Triton kernels, PyTorch fallback).

Kernels: fwd.py, bwd.py, index.py; launch configs: configs.py; launchers: launch.py; autograd Function and
registered ops: function.py; this module: the documented public function and its checks.
"""
import math
import os

import torch

from ..launch import BLOCK, HAVE_TRITON, NO_TRITON, KernelOptions, check_options
from ..reference import block_sparse_attention_torch

if HAVE_TRITON:  # the kernels' modules import triton; without it only backend="torch" runs (resolve_backend)
    from .function import BlockSparseAttentionFunction
    from .launch import key_shift as mean_key

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def block_sparse_attention(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale=None, backend="auto",
                           key_shift=None, *, options: KernelOptions | None = None):
    """Softmax attention of each 64-row query tile to the real rows of its selected 64-row key tiles.

    Layout: tokens in padded tile order. Tile i holds rows [64 i, 64 i + 64) of the sequence; its first
    kv_tile_sizes[i] rows are real tokens, the rest are padding (any finite values).

    Args:
        q, k, v: [B, S_pad, H, D], S_pad = 64 * n_tiles, D in {64, 128}, one dtype of fp16/bf16/fp32
            (float64 too with backend="torch"); any strides.
        q2k_index: int32 [B, H, n_tiles, K]. q2k_index[b, h, i, :q2k_count[b, h, i]] are the distinct key
            tiles that query tile i attends to (order not significant); later entries are ignored.
        q2k_count: int32 [B, H, n_tiles], each in [1, K].
        kv_tile_sizes: int32 [n_tiles], real tokens per tile, each in [1, 64]. Pad key rows never get
            probability; pad query rows are computed like real ones and are for the caller to drop.
        scale: softmax scale, a positive finite number, default 1 / sqrt(D).
        backend: "triton" (CUDA, or CPU tensors when TRITON_INTERPRET=1 was set before triton was imported),
            "torch" (vsa_train.ops.reference), or "auto" = triton on CUDA tensors, torch otherwise.
        key_shift: Triton only: float [B, H, D], a vector per (batch, head) subtracted from every key in the
            backward's dq = scale * dS @ K (exact for any shift: each row of dS sums to dLSE, whose term is
            added back), for a well-conditioned dq when keys share a large offset (issue #12). out, lse, dk
            and dv do not use it. Default: the mean of the real key rows (launch.key_shift) when
            options.center_keys is set, else none. A constant (no gradient).
        options: KernelOptions (Triton only): key centring, tile pairing, NaN-poisoned outputs; default the
            training defaults.

    Returns:
        out: [B, S_pad, H, D] in q's dtype, out[b, s, h] = sum_j softmax_j(scale * q[b, s, h] . k[b, j, h]) v[b, j, h]
            over the real rows j of the selected key tiles of the tile of s.
        lse: float32 [B, H, S_pad], the natural-log log-sum-exp of those scaled logits.

    Differentiable w.r.t. q, k and v (and through lse). The Triton backward uses no atomics: two runs on
    the same inputs give bitwise equal gradients. Index values are checked on CPU tensors only (checking
    CUDA tensors would synchronise the device); on CUDA they are trusted, as built by the coarse stage.
    """
    _check_inputs(q, k, v, q2k_index, q2k_count, kv_tile_sizes)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # The forward kernel takes the row max of unscaled logits (max(c s) = c max(s) needs c > 0).
    # (A number, or a SymFloat under torch.compile: compared, not type-checked.)
    try:
        valid = not isinstance(scale, (bool, torch.Tensor)) and 0 < scale < math.inf
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"block_sparse_attention: scale must be a positive finite number, got {scale!r}")
    backend = resolve_backend(backend, q)
    if backend == "torch":
        return block_sparse_attention_torch(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale=scale)
    if q.dtype == torch.float64:
        raise TypeError("block_sparse_attention: backend='triton' supports fp16, bf16 and fp32, got float64")
    options = check_options(options)
    # The key->query index of the backward is built only when a backward can follow.
    build_k2q = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key_shift = _key_shift(q, k, kv_tile_sizes, key_shift, build_k2q, options)
    return BlockSparseAttentionFunction.apply(q, k, v, q2k_index, q2k_count, kv_tile_sizes, float(scale), key_shift,
                                              build_k2q, options)


def _key_shift(q, k, kv_tile_sizes, key_shift, build_k2q: bool, options: KernelOptions):
    """The fp32 [B, H, D] shift of the keys in the backward's dQ, or None (no backward, or centring off)."""
    if not build_k2q:  # only the backward uses it
        return None
    if key_shift is None:
        if not options.center_keys:
            return None
        with torch.no_grad():
            return mean_key(k, kv_tile_sizes)  # [B, H, D] fp32
    B, _, H, D = q.shape
    if tuple(key_shift.shape) != (B, H, D) or key_shift.device != q.device or not key_shift.is_floating_point():
        raise ValueError(f"block_sparse_attention: key_shift must be a float [B, H, D] = [{B}, {H}, {D}] "
                         f"tensor on {q.device}, got {key_shift.dtype} {tuple(key_shift.shape)} on {key_shift.device}")
    return key_shift.detach().to(torch.float32).contiguous()


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend ("triton" or "torch") for q; a clear error for Triton without the triton package, or on
    CPU without its interpreter."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"block_sparse_attention: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton" and not HAVE_TRITON:
        raise RuntimeError(f"block_sparse_attention: backend='triton' needs {NO_TRITON}; or use backend='torch'")
    if backend == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "block_sparse_attention: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
            "is imported; use backend='torch' (or 'auto') on CPU")
    return backend


def _check_inputs(q, k, v, q2k_index, q2k_count, kv_tile_sizes):
    name = "block_sparse_attention"
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be [B, S_pad, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{name}: q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (*_FLOAT_DTYPES, torch.float64):
        raise TypeError(f"{name}: q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, S, H, D = q.shape
    if S % BLOCK or S == 0:
        raise ValueError(f"{name}: S_pad must be a positive multiple of {BLOCK} (padded tile order), got {S}")
    if D not in (64, 128):
        raise ValueError(f"{name}: head dim must be 64 or 128, got {D}")
    n_tiles = S // BLOCK
    tensors = {"k": k, "v": v, "q2k_index": q2k_index, "q2k_count": q2k_count, "kv_tile_sizes": kv_tile_sizes}
    for arg, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, q on {q.device}")
    for arg in ("q2k_index", "q2k_count", "kv_tile_sizes"):
        if tensors[arg].dtype != torch.int32:
            raise TypeError(f"{name}: {arg} must be int32, got {tensors[arg].dtype}")
    if q2k_index.dim() != 4 or tuple(q2k_index.shape[:3]) != (B, H, n_tiles) or q2k_index.shape[3] < 1:
        raise ValueError(f"{name}: q2k_index must be [B, H, n_tiles, K] = [{B}, {H}, {n_tiles}, K>=1], "
                         f"got {tuple(q2k_index.shape)}")
    if tuple(q2k_count.shape) != (B, H, n_tiles):
        raise ValueError(f"{name}: q2k_count must be [B, H, n_tiles] = [{B}, {H}, {n_tiles}], got {tuple(q2k_count.shape)}")
    if tuple(kv_tile_sizes.shape) != (n_tiles,):
        raise ValueError(f"{name}: kv_tile_sizes must be [n_tiles] = [{n_tiles}], got {tuple(kv_tile_sizes.shape)}")
    if q.is_cuda or torch.compiler.is_compiling():
        return
    K = q2k_index.shape[3]
    if ((q2k_count < 1) | (q2k_count > K)).any():
        raise ValueError(f"{name}: every q2k_count must be in [1, K={K}]")
    used = torch.arange(K) < q2k_count[..., None]
    if ((q2k_index < 0) | (q2k_index >= n_tiles))[used].any():
        raise ValueError(f"{name}: q2k_index entries within q2k_count must be tile ids in [0, {n_tiles})")
    if ((kv_tile_sizes < 1) | (kv_tile_sizes > BLOCK)).any():
        raise ValueError(f"{name}: kv_tile_sizes must be in [1, {BLOCK}]")
