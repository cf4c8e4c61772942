"""Autotuning configs of the block-sparse kernels (one config under the Triton interpreter, where speed is moot).

The tile is fixed at 64 x 64 by the tiling, so only warps and pipelining depth are tuned. The default lists
are short because every config is compiled once per (head dim, dtype) on first use; VSA_AUTOTUNE=full
(set before import) searches more, e.g. on a GPU other than the H100 the defaults were picked on.
"""
import os

import triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _full_search() -> bool:
    return os.environ.get("VSA_AUTOTUNE", "fast") == "full"


def fwd_configs() -> list:
    """Forward kernel."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    stages = (2, 3, 4) if _full_search() else (3,)
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in stages]


def bwd_configs() -> list:
    """Backward dQ and dK/dV kernels."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    stages = (1, 2, 3) if _full_search() else (2,)
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in stages]
