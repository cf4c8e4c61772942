"""Autotuning configs of the block-sparse kernels (one config under the Triton interpreter, where speed is moot)."""
import os

import triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fwd_configs() -> list:
    """Forward: warps and pipelining depth (the tile is fixed at 64 x 64 by the tiling)."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


def bwd_configs() -> list:
    """Backward dQ and dK/dV kernels."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
