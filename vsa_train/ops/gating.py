"""The VSA combine O = O_c * G_c + O_f * G_f in one Triton kernel (and one for its backward).

`gated_combine_fwd` reads the fine output in padded tile order and the per-tile coarse output (float32, never
rounded to half), and writes O either in padded tile order or, given the layout's raster-token table,
straight into raster order: the raster path then never builds tile-order copies of the gates or of O.
The backward kernel returns dO_f in padded tile order (pad rows 0), the gates' gradients in the gates'
order, and dO_c summed over each tile's rows in float32. `vsa.combine` is the PyTorch reference;
vsa_function.py is the only caller.
"""
import torch
import triton
import triton.language as tl

from .launch import BLOCK, device_guard, new_output

__all__ = ["gated_combine_bwd", "gated_combine_fwd"]


# Size arguments are not specialised on (== 1, divisible by 16): one compile serves every video size.
@triton.jit(do_not_specialize=["n_heads", "n_tiles", "out_len"])
def gated_combine_fwd_kernel(
    OC, OF, GC, GF, OUT, TOKENS,  # fp32 [B, n, H, D] (strided); [B, S_pad, H, D]; gates/out [B, S_out, H, D]; int32 [S_pad]
    stride_cb, stride_cn, stride_ch,
    n_heads, n_tiles, out_len,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, RASTER: tl.constexpr, HAS_GC: tl.constexpr, HAS_GF: tl.constexpr,
):
    """One program = one tile of one (batch, head): its rows of O_c * G_c + O_f * G_f."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_r = tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    if RASTER:  # output (and gate) row of each padded row: its raster token; pad rows are not written
        row = tl.load(TOKENS + offs_r)
        real = (row >= 0)[:, None]
    else:
        row = offs_r
        real = (offs_r >= 0)[:, None]
    fine = ((b * n_tiles * BLOCK + offs_r[:, None]) * n_heads + h) * HEAD_DIM + offs_d[None, :]
    outer = ((b * out_len + row[:, None].to(tl.int64)) * n_heads + h) * HEAD_DIM + offs_d[None, :]
    o_c = tl.load(OC + b * stride_cb + tile * stride_cn + h * stride_ch + offs_d)  # [D] fp32
    o_f = tl.load(OF + fine, mask=real, other=0.0).to(tl.float32)
    if HAS_GC:
        coarse = o_c[None, :] * tl.load(GC + outer, mask=real, other=0.0).to(tl.float32)
    else:
        coarse = tl.zeros([BLOCK, HEAD_DIM], tl.float32) + o_c[None, :]
    if HAS_GF:
        o_f = o_f * tl.load(GF + outer, mask=real, other=0.0).to(tl.float32)
    tl.store(OUT + outer, (coarse + o_f).to(OUT.dtype.element_ty), mask=real)


@triton.jit(do_not_specialize=["n_heads", "n_tiles", "out_len"])
def gated_combine_bwd_kernel(
    DOUT, OC, OF, GC, GF, DOC, DOF, DGC, DGF, TOKENS,  # as the forward; DOC fp32 [B, n, H, D] contiguous
    stride_cb, stride_cn, stride_ch,
    n_heads, n_tiles, out_len,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, RASTER: tl.constexpr, HAS_GC: tl.constexpr, HAS_GF: tl.constexpr,
):
    """One program = one tile of one (batch, head): dO_f, dG_c, dG_f of its rows and dO_c of the tile."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_r = tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    if RASTER:
        row = tl.load(TOKENS + offs_r)
        real = (row >= 0)[:, None]
    else:
        row = offs_r
        real = (offs_r >= 0)[:, None]
    fine = ((b * n_tiles * BLOCK + offs_r[:, None]) * n_heads + h) * HEAD_DIM + offs_d[None, :]
    outer = ((b * out_len + row[:, None].to(tl.int64)) * n_heads + h) * HEAD_DIM + offs_d[None, :]
    dout = tl.load(DOUT + outer, mask=real, other=0.0).to(tl.float32)  # pad rows: 0
    o_c = tl.load(OC + b * stride_cb + tile * stride_cn + h * stride_ch + offs_d)
    # dO_f is written on every padded row (0 on pad rows in raster mode): no zero fill needed.
    if HAS_GF:
        d_fine = dout * tl.load(GF + outer, mask=real, other=0.0).to(tl.float32)
        o_f = tl.load(OF + fine, mask=real, other=0.0).to(tl.float32)
        tl.store(DGF + outer, (dout * o_f).to(DGF.dtype.element_ty), mask=real)
    else:
        d_fine = dout
    tl.store(DOF + fine, d_fine.to(DOF.dtype.element_ty))
    if HAS_GC:
        gc = tl.load(GC + outer, mask=real, other=0.0).to(tl.float32)
        tl.store(DGC + outer, (dout * o_c[None, :]).to(DGC.dtype.element_ty), mask=real)
        d_coarse = tl.sum(dout * gc, 0)
    else:
        d_coarse = tl.sum(dout, 0)
    tl.store(DOC + ((b * n_tiles + tile) * n_heads + h) * HEAD_DIM + offs_d, d_coarse)


def _contiguous(x):
    return None if x is None else x.contiguous()


def gated_combine_fwd(o_coarse, o_fine, gate_coarse, gate_fine, raster_tokens, out_len: int,
                      poison: bool = False) -> torch.Tensor:
    """Launch the forward kernel: O [B, out_len, H, D] in o_fine's dtype (raster order given raster_tokens).

    o_coarse: fp32 [B, n, H, D], any strides with contiguous channels; o_fine: [B, S_pad, H, D] in padded tile
    order; gates like O or None (a missing gate is 1); raster_tokens: int32 [S_pad] (TileLayout.raster_tokens)
    for O and the gates in raster order, None for padded tile order.
    """
    B, S_pad, H, D = o_fine.shape
    n = S_pad // BLOCK
    out = new_output((B, out_len, H, D), o_fine.dtype, o_fine.device, poison)
    with device_guard(o_fine):
        gated_combine_fwd_kernel[(n, B * H)](
            o_coarse, o_fine.contiguous(), _contiguous(gate_coarse), _contiguous(gate_fine), out, raster_tokens,
            o_coarse.stride(0), o_coarse.stride(1), o_coarse.stride(2), H, n, out_len,
            HEAD_DIM=D, BLOCK=BLOCK, RASTER=raster_tokens is not None,
            HAS_GC=gate_coarse is not None, HAS_GF=gate_fine is not None, num_warps=4,
        )
    return out


def gated_combine_bwd(dout, o_coarse, o_fine, gate_coarse, gate_fine, raster_tokens, poison: bool = False):
    """Launch the backward kernel: (dO_c fp32 [B, n, H, D], dO_f, dG_c, dG_f; an absent gate's gradient is empty)."""
    B, S_pad, H, D = o_fine.shape
    n = S_pad // BLOCK
    out_len = dout.shape[1]
    d_coarse = new_output((B, n, H, D), torch.float32, o_fine.device, poison)
    d_fine = new_output(o_fine.shape, o_fine.dtype, o_fine.device, poison)
    d_gc = new_output(dout.shape, dout.dtype, dout.device, poison) if gate_coarse is not None else dout.new_empty(0)
    d_gf = new_output(dout.shape, dout.dtype, dout.device, poison) if gate_fine is not None else dout.new_empty(0)
    with device_guard(o_fine):
        gated_combine_bwd_kernel[(n, B * H)](
            dout.contiguous(), o_coarse, o_fine.contiguous(), _contiguous(gate_coarse), _contiguous(gate_fine),
            d_coarse, d_fine, d_gc, d_gf, raster_tokens,
            o_coarse.stride(0), o_coarse.stride(1), o_coarse.stride(2), H, n, out_len,
            HEAD_DIM=D, BLOCK=BLOCK, RASTER=raster_tokens is not None,
            HAS_GC=gate_coarse is not None, HAS_GF=gate_fine is not None, num_warps=4,
        )
    return d_coarse, d_fine, d_gc, d_gf
