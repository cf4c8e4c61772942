"""Autotuning configs of the block-sparse kernels (one config under the Triton interpreter, where speed is moot).

The tile is fixed at 64 x 64 by the tiling, so only warps and pipelining depth are tuned; the lists are
short because every config is compiled once per (head dim, dtype) on first use.
"""
import os

import triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fwd_configs() -> list:
    """Forward kernel."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=3) for w in (4, 8)]


def bwd_configs() -> list:
    """Backward dQ and dK/dV kernels."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=2) for w in (4, 8)]
