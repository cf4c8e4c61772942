"""Video Sparse Attention: coarse stage + top-k tile selection + block-sparse fine stage (docs/design.md,
'VSA: the algorithm' and 'VSA: op contract').

`video_sparse_attention` takes tokens in raster order; `video_sparse_attention_tiled` takes them already
in padded tile order (for models that reorder once per forward, not once per layer). Both check their
inputs and raise ValueError/TypeError that name the argument and what was expected.
"""
from numbers import Integral

import torch

from .block_sparse import block_sparse_attention
from .block_sparse import resolve_backend as resolve_block_sparse_backend
from .coarse import coarse_attention, tile_mean, topk_tiles
from .launch import BLOCK, HAVE_TRITON, KernelOptions, check_options
from .reference import block_sparse_attention_torch
from .tiling import TileLayout

if HAVE_TRITON:  # the Triton op; without triton, _check_inputs refuses backend="triton" (resolve_backend)
    from .vsa_function import VideoSparseAttentionFunction

__all__ = ["combine", "video_sparse_attention", "video_sparse_attention_tiled", "warm_up"]

BACKENDS = ("auto", "triton", "torch")
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TRITON_HEAD_DIMS = (64, 128)


def video_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    video_shape,
    topk: int,
    gate_coarse: torch.Tensor | None = None,
    gate_fine: torch.Tensor | None = None,
    tile=(4, 4, 4),
    backend: str = "auto",
    *,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """VSA on tokens in raster order of video_shape = (T, H, W).

    q, k, v, gate_coarse, gate_fine, out: [B, S, H, D] with S = T * H * W. Each query token attends to the
    real tokens of the `topk` key tiles whose pooled keys score highest against its tile's pooled query
    (all tiles if topk >= n_tiles), plus the coarse tile-level attention output:
    out = O_coarse * gate_coarse + O_fine * gate_fine (a missing gate is 1). Scale 1/sqrt(D).
    tile: tile shape (prod 64 for the Triton backend; any for "torch"). backend: "auto" (Triton for
    CUDA tensors, PyTorch otherwise), "triton" or "torch". options: KernelOptions for the Triton kernels
    (default: what training runs). Differentiable w.r.t. q, k, v and the gates.
    """
    layout = TileLayout(video_shape, tile)
    backend = _check_inputs(q, k, v, gate_coarse, gate_fine, topk, backend, layout, tiled=False)
    q, k, v = (layout.to_tiles(x) for x in (q, k, v))  # [B, S_pad, H, D] each
    if backend == "triton":  # gates read and O written in raster order by the combine kernel
        return _triton(q, k, v, gate_coarse, gate_fine, layout, topk, options, raster=True)  # [B, S, H, D]
    o_coarse, o_fine = _attend_torch(q, k, v, layout, topk)  # [B, n, H, D], [B, S_pad, H, D]
    gate_coarse, gate_fine = (None if x is None else layout.to_tiles(x) for x in (gate_coarse, gate_fine))
    return layout.from_tiles(combine(o_coarse, o_fine, gate_coarse, gate_fine))  # [B, S, H, D]


def video_sparse_attention_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TileLayout,
    topk: int,
    gate_coarse: torch.Tensor | None = None,
    gate_fine: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """VSA on tokens already in padded tile order of `layout` ([B, S_pad, H, D] in, same layout out).

    Same semantics as `video_sparse_attention`. Pad rows of the inputs may hold anything finite: they are
    never attended to or pooled; the output's pad rows are unspecified (drop them or ignore them).
    """
    if not isinstance(layout, TileLayout):
        raise TypeError(f"layout must be a TileLayout, got {type(layout).__name__}")
    backend = _check_inputs(q, k, v, gate_coarse, gate_fine, topk, backend, layout, tiled=True)
    if backend == "triton":
        return _triton(q, k, v, gate_coarse, gate_fine, layout, topk, options, raster=False)  # [B, S_pad, H, D]
    o_coarse, o_fine = _attend_torch(q, k, v, layout, topk)  # [B, n, H, D], [B, S_pad, H, D]
    return combine(o_coarse, o_fine, gate_coarse, gate_fine)  # [B, S_pad, H, D]


def combine(
    o_coarse: torch.Tensor,
    o_fine: torch.Tensor,
    gate_coarse: torch.Tensor | None = None,
    gate_fine: torch.Tensor | None = None,
) -> torch.Tensor:
    """O = O_c * G_c + O_f * G_f in padded tile order: o_coarse [B, n, H, D] per tile, the rest [B, S_pad, H, D].

    PyTorch; the reference of the Triton combine (gating.py). O_c is rounded to o_fine's dtype first.
    """
    B, S_pad, H, D = o_fine.shape
    n = o_coarse.shape[1]
    o_c = o_coarse.to(o_fine.dtype)[:, :, None]  # [B, n, 1, H, D]: one row per tile, broadcast over its rows
    if gate_coarse is not None:
        o_c = o_c * gate_coarse.view(B, n, -1, H, D)  # [B, n, block, H, D]
    o_f = o_fine if gate_fine is None else o_fine * gate_fine  # [B, S_pad, H, D]
    return (o_f.view(B, n, -1, H, D) + o_c).view(B, S_pad, H, D)  # [B, S_pad, H, D]


def warm_up(head_dim: int, dtype: torch.dtype, device, gate_coarse: bool = True, gate_fine: bool = False, *,
            op: bool = True, grad: bool = True) -> torch.Tensor | None:
    """Compile the Triton kernels of the op for one head dim, dtype and set of gates, by one call on a tiny input:
    one head, four 64-token tiles.

    op=False: only the fine stage (`block_sparse_attention`, what the sparse variants call). grad=False: a forward
    without gradient (the kernels an eval launches); grad=True: a forward with gradient, returning a scalar whose
    backward launches the backward kernels (the caller runs it). The kernels do not specialise
    on sizes, so these compiles serve every video size and head count (models/vsa.py runs this in a background
    thread while torch.compile traces). Launches on `device`; raises what the op raises on an unsupported head dim
    or dtype.
    """
    layout = TileLayout((4, 8, 8), (4, 4, 4))  # 4 full tiles
    shape = (1, layout.padded_len, 1, head_dim)
    rng = torch.Generator(device).manual_seed(0)  # its own: the device's default RNG is the training's
    with torch.set_grad_enabled(grad):
        q, k, v, gc, gf = (torch.randn(shape, generator=rng, device=device, dtype=dtype).requires_grad_(grad) if use
                           else None for use in (True, True, True, gate_coarse and op, gate_fine and op))
        if op:
            out = video_sparse_attention_tiled(q, k, v, layout, 2, gc, gf, backend="triton")  # [1, 256, 1, D]
        else:  # each query tile attends to itself and the next
            tiles = torch.arange(4, device=device, dtype=torch.int32)
            index = torch.stack([tiles, (tiles + 1) % 4], dim=-1)[None, None]  # [1, 1, 4, 2]
            count = torch.full((1, 1, 4), 2, device=device, dtype=torch.int32)
            out, _ = block_sparse_attention(q, k, v, index, count, layout.kv_tile_sizes(device), backend="triton")
        return out.float().square().sum() if grad else None


def _triton(q, k, v, gate_coarse, gate_fine, layout, topk, options, raster: bool):
    """The Triton op on checked inputs in padded tile order; O in raster order if raster, else in tile order."""
    sizes = layout.kv_tile_sizes(q.device)  # [n] int32
    tokens, out_len = (layout.raster_tokens(q.device), layout.seq_len) if raster else (None, q.shape[1])
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, gate_coarse, gate_fine))
    return VideoSparseAttentionFunction.apply(q, k, v, gate_coarse, gate_fine, sizes, tokens, out_len, topk,
                                              need_grad, check_options(options))


def _attend_torch(q, k, v, layout, topk):
    """Coarse stage, selection and fine stage in PyTorch on checked inputs in padded tile order: (O_c, O_f)."""
    sizes = layout.kv_tile_sizes(q.device)  # [n] int32
    scale = q.shape[-1] ** -0.5
    q_c, k_c, v_c = tile_mean(q, sizes), tile_mean(k, sizes), tile_mean(v, sizes)  # [B, n, H, D] each
    o_coarse, scores = coarse_attention(q_c, k_c, v_c, scale)  # [B, n, H, D] (fp32 for half inputs), [B, H, n, n]
    q2k_index, q2k_count = topk_tiles(scores, topk)  # [B, H, n, K], [B, H, n]
    o_fine, _ = block_sparse_attention_torch(q, k, v, q2k_index, q2k_count, sizes, scale)
    return o_coarse, o_fine  # [B, n, H, D], [B, S_pad, H, D]


def _check_inputs(q, k, v, gate_coarse, gate_fine, topk, backend, layout, tiled):
    """Raise a clear error for bad arguments; return the concrete backend ("triton" or "torch")."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, S, H, D] (4 dims), got shape {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be bfloat16, float16, float32 or float64, got {q.dtype}")
    S, expected = q.shape[1], layout.padded_len if tiled else layout.seq_len
    if S != expected:
        what = "S_pad = n_tiles * prod(tile)" if tiled else "S = T * H * W"
        raise ValueError(
            f"q has {S} tokens but video_shape={layout.video_shape} with tile={layout.tile} needs "
            f"{what} = {expected}"
        )

    others = {"k": k, "v": v, "gate_coarse": gate_coarse, "gate_fine": gate_fine}
    for name, x in others.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} [B, S, H, D], got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")

    if not isinstance(topk, Integral) or isinstance(topk, bool):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1 (number of key tiles per query tile), got {topk}")

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        resolve_block_sparse_backend("triton", q)  # CPU tensors need the Triton interpreter: a clear error
        D = q.shape[-1]
        if D not in TRITON_HEAD_DIMS:
            raise ValueError(f"backend='triton' supports head dims {TRITON_HEAD_DIMS}, got D={D}; use backend='torch'")
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports bf16/fp16/fp32, got {q.dtype}; use backend='torch'")
        if layout.block != BLOCK:
            raise ValueError(
                f"backend='triton' needs prod(tile) == {BLOCK}, got tile={layout.tile}; use backend='torch'"
            )
    return backend
