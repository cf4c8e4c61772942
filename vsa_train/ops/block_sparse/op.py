"""Launchers of the Triton kernels and their torch custom ops (fake shapes + autograd), so torch.compile traces through."""
import contextlib

import torch

from .. import warm
from . import configs
from .bwd import (
    block_sparse_bwd_dkv_kernel,
    block_sparse_bwd_dq_kernel,
    block_sparse_bwd_preprocess_kernel,
)
from .fwd import block_sparse_fwd_kernel
from .index import build_k2q_index

TILE = 64  # rows of a (padded) video tile = rows of one kernel block

# Tests set this to allocate every kernel output filled with NaN, so that an unwritten element shows up.
POISON_OUTPUTS = False

# Compute dQ with centred keys (issue #12): dQ = scale * (dS @ (K - k_mean) + dLSE k_mean), exact since each
# row of dS = P * (dP - delta) sums to dLSE (0 without an LSE gradient). With keys sharing a large offset
# (common in trained models) the 16-bit dS @ K cancels badly (bf16 dq error 4e-2 on an H200, like cuDNN's);
# centred, it does not. The dQ kernel forms rounded(dS) @ K - rowsum(rounded(dS)) k_mean, in which the offset
# cancels in fp32 (no pass over K, no copy of it, no per-tile centring: bwd.py); the logits, O, LSE, dK and dV
# use K as given and are unchanged. k_mean is over the real key rows of each
# (batch, head) (key_shift; the VSA op takes it from its pooled tile means). Read when an op is called
# (block_sparse_attention, both VSA paths); tests clear it for the uncentred baseline.
CENTER_KEYS = True

# Two 64-row tiles per loop iteration in all three attention kernels (forward: two key tiles of the query tile;
# dQ: the same; dK/dV: two of the query tiles that chose the key tile), gathered into one 128-row block: the
# tensor cores get 64 x 128 products instead of 64 x 64 and the loops half the iterations. An odd count's last
# iteration has an empty second slot (masked: probability 0). "auto": pairs at head dim 64 only. Measured on an
# H200 (docs/benchmarks.md, "Faster"): at D=64 pairs cut dQ by 14%, dK/dV by 10%, the forward by 3%; at D=128 they
# spill registers in the backward and halve the blocks per SM in the forward (fwd+bwd 1.7x slower). True / False
# force either. Read when an op is called (block_sparse_attention, both VSA paths), passed to the kernels as PAIR;
# each setting is autotuned and compiled separately. The two differ only by rounding (another summation order).
TILE_PAIRS = "auto"


def tile_pairs(head_dim: int) -> bool:
    """Whether the kernels take two tiles per iteration at this head dim (TILE_PAIRS)."""
    return head_dim == 64 if TILE_PAIRS == "auto" else bool(TILE_PAIRS)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised kernel output (NaN-filled when POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay fp32 in the matrix units ("ieee", not tf32); 16-bit inputs ignore this setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def device_guard(t: torch.Tensor):
    """Context that makes t's CUDA device current (a no-op on the CPU)."""
    # Triton launches on the current CUDA device, which need not be the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Config launched per (kernel, head dim, dtype, TILE_PAIRS): configs.py's default, or the autotuner's pick under
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
    real = (torch.arange(TILE, device=k.device) < kv_tile_sizes[:, None]).reshape(-1)  # [S]
    weights = (real.to(torch.float32) / kv_tile_sizes.sum().to(torch.float32)).to(k.dtype)  # [S]
    mean = torch.matmul(weights, k.reshape(B, S, H * D))  # [B, H * D]
    return mean.view(B, H, D).to(torch.float32).contiguous()


def key_shift_from_tile_means(k_means: torch.Tensor, kv_tile_sizes: torch.Tensor) -> torch.Tensor:
    """fp32 [B, H, D] contiguous: key_shift from the fp32 tile means [B, H, n, D] of the VSA pooling (no pass over K)."""
    sizes = kv_tile_sizes.to(torch.float32)  # [n]
    return (torch.matmul(sizes, k_means) / sizes.sum()).contiguous()  # [B, H, D]


def block_sparse_fwd_triton(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale: float):
    """Launch the forward kernel. Returns out [B, S, H, D] (contiguous, q's dtype) and lse [B, H, S] fp32."""
    B, S, H, D = q.shape
    n_tiles = S // TILE
    out = new_output((B, S, H, D), q.dtype, q.device)
    lse = new_output((B, H, S), torch.float32, q.device)
    q2k_index, q2k_count = q2k_index.contiguous(), q2k_count.contiguous()
    pair = tile_pairs(D)
    with device_guard(q):
        launch_tuned(
            block_sparse_fwd_kernel, (n_tiles, B * H), (D, q.dtype, pair), configs.fwd_default,
            q, k, v, out, lse, q2k_index, q2k_count, kv_tile_sizes.contiguous(),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, n_tiles, q2k_index.shape[-1], scale,
            HEAD_DIM=D, BLOCK=TILE, DOT_PRECISION=_dot_precision(q.dtype), PAIR=pair,
        )
    return out, lse


def block_sparse_bwd_triton(do, dlse, q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles,
                            kv_tile_sizes, scale: float, shift=None):
    """Launch delta preprocess, dQ and dK/dV kernels. Returns dq, dk, dv ([B, S, H, D], contiguous).

    shift: None, or fp32 [B, H, D] (key_shift): the dQ kernel computes dS @ (K - shift) as dS @ K - rowsum(dS) shift
    (CENTER_KEYS).
    Any shift gives the exact dQ; it is a constant to autograd (dK, dV and the forward do not use it).
    """
    B, S, H, D = q.shape
    dlse = dlse.contiguous() if dlse is not None else None
    n_tiles = S // TILE
    grid = (n_tiles, B * H)
    precision = _dot_precision(q.dtype)
    pair = tile_pairs(D)
    sizes = kv_tile_sizes.contiguous()
    delta = new_output((B, H, S), torch.float32, q.device)
    dq = new_output((B, S, H, D), q.dtype, q.device)
    dk = new_output((B, S, H, D), k.dtype, q.device)
    dv = new_output((B, S, H, D), v.dtype, q.device)
    with device_guard(q):
        block_sparse_bwd_preprocess_kernel[grid](
            out, do, dlse if dlse is not None else delta, delta,
            *out.stride(), *do.stride(), H, S,
            HEAD_DIM=D, BLOCK=TILE, HAS_DLSE=dlse is not None,
        )
        launch_tuned(
            block_sparse_bwd_dq_kernel, grid, (D, q.dtype, pair), configs.bwd_default,
            q, k, v, do, dq, lse, delta, q2k_index.contiguous(), q2k_count.contiguous(), sizes,
            shift.contiguous() if shift is not None else delta, dlse if dlse is not None else delta,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, n_tiles, q2k_index.shape[-1], scale,
            HEAD_DIM=D, BLOCK=TILE, DOT_PRECISION=precision, HAS_SHIFT=shift is not None, HAS_DLSE=dlse is not None,
            PAIR=pair,
        )
        launch_tuned(
            block_sparse_bwd_dkv_kernel, grid, (D, q.dtype, pair), configs.bwd_default,
            q, k, v, do, dk, dv, lse, delta, k2q_offsets.contiguous(), k2q_q_tiles.contiguous(), sizes,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            H, n_tiles, k2q_q_tiles.shape[-1], scale,
            HEAD_DIM=D, BLOCK=TILE, DOT_PRECISION=precision, PAIR=pair,
        )
    return dq, dk, dv


@torch.library.custom_op("vsa_train::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q2k_index: torch.Tensor, q2k_count: torch.Tensor, kv_tile_sizes: torch.Tensor,
    scale: float, build_k2q: bool, shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward op: (out, lse, k2q_offsets, k2q_q_tiles); the k2q index is built only when a backward will follow.

    shift: None, or the fp32 [B, H, D] key shift the backward's dQ uses (key_shift); a constant to autograd.
    """
    warm.wait(grad=build_k2q)  # not while a warm-up compiles these kernels (ops/warm.py)
    out, lse = block_sparse_fwd_triton(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale)
    if build_k2q:
        with device_guard(q):
            k2q_offsets, k2q_q_tiles = build_k2q_index(q2k_index, q2k_count, kv_tile_sizes.shape[0])
    else:  # two distinct tensors: a custom op's outputs must not alias each other
        k2q_offsets, k2q_q_tiles = q2k_index.new_empty(0), q2k_index.new_empty(0)
    return out, lse, k2q_offsets, k2q_q_tiles


@block_sparse_fwd.register_fake
def _block_sparse_fwd_fake(q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale, build_k2q, shift=None):
    B, S, H, D = q.shape
    _, _, n_q_tiles, max_k = q2k_index.shape
    out = q.new_empty(B, S, H, D)
    lse = q.new_empty(B, H, S, dtype=torch.float32)
    if build_k2q:
        k2q_offsets = q2k_index.new_empty(B, H, kv_tile_sizes.shape[0] + 1)
        k2q_q_tiles = q2k_index.new_empty(B, H, n_q_tiles * max_k)
    else:
        k2q_offsets, k2q_q_tiles = q2k_index.new_empty(0), q2k_index.new_empty(0)
    return out, lse, k2q_offsets, k2q_q_tiles


@torch.library.custom_op("vsa_train::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(
    do: torch.Tensor, dlse: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    q2k_index: torch.Tensor, q2k_count: torch.Tensor, k2q_offsets: torch.Tensor, k2q_q_tiles: torch.Tensor,
    kv_tile_sizes: torch.Tensor, scale: float, shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward op: (dq, dk, dv) from dO (and dLSE, which may be None); dQ with keys centred by shift if given (bwd.py)."""
    return block_sparse_bwd_triton(do, dlse, q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles,
                                   kv_tile_sizes, scale, shift)


@block_sparse_bwd.register_fake
def _block_sparse_bwd_fake(do, dlse, q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles,
                           kv_tile_sizes, scale, shift=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, q2k_index, q2k_count, kv_tile_sizes, scale, _build_k2q, *rest = inputs
    shift = rest[0] if rest else None
    out, lse, k2q_offsets, k2q_q_tiles = output
    ctx.save_for_backward(q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles, kv_tile_sizes, shift)
    ctx.scale = scale


def _backward(ctx, dout, dlse, _dk2q_offsets, _dk2q_q_tiles):
    q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles, kv_tile_sizes, shift = ctx.saved_tensors
    if k2q_offsets.numel() == 0:
        raise RuntimeError("block_sparse_fwd ran with build_k2q=False, so it cannot be differentiated")
    dq, dk, dv = block_sparse_bwd(dout, dlse, q, k, v, out, lse, q2k_index, q2k_count, k2q_offsets, k2q_q_tiles,
                                  kv_tile_sizes, ctx.scale, shift)
    return dq, dk, dv, None, None, None, None, None, None


block_sparse_fwd.register_autograd(_backward, setup_context=_setup_context)
