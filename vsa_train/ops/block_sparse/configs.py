"""Autotuning configs of the block-sparse kernels (one config under the Triton interpreter, where speed is moot).

The tile is fixed at 64 x 64 by the tiling (64 x 128 with op.TILE_PAIRS: two tiles per iteration, tuned
separately through the kernels' PAIR argument), so only warps and pipelining depth are tuned. By default each
kernel has one config, the autotuner's pick on an H200 (and earlier on an H100) at D=64 with pairs and D=128
without, the settings op.TILE_PAIRS="auto" runs: 4 warps, 3 stages forward, 2 backward. Every config costs a
compilation on first use (about 1 s each, inside a dit_1b run's first step), so a search is opt-in:
VSA_AUTOTUNE=full (set before import) tries 4 and 8 warps at several depths, e.g. on another GPU.
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
    if not _full_search():
        return [triton.Config({}, num_warps=4, num_stages=3)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


def bwd_configs() -> list:
    """Backward dQ and dK/dV kernels."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    if not _full_search():
        return [triton.Config({}, num_warps=4, num_stages=2)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
