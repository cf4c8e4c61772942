"""Launch configs of the block-sparse kernels: a default per kernel and pairing, or an autotuner search.

The tile is fixed at 64 x 64 by the tiling (64 x 128 with tile pairs: two tiles per iteration), so only warps
and pipelining depth are tuned. By default each kernel launches with the config that timed best at the
pairings the default options run (D=64 with pairs, D=128 without): 4 warps; the forward 2 stages with pairs
and 3 without, the backward 2 (reproduce with `python -m vsa_train.bench op`). No search runs then
(launch.launch_tuned launches the default directly: Triton 3.6's autotuner would time even a single
config). VSA_AUTOTUNE=full (read at each first launch) makes the autotuner try 4 and 8 warps at several depths on first
use, e.g. on another GPU; every config costs a compilation (about 1 s each, inside a run's first step).
"""
import os

import triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def full_search() -> bool:
    """Whether the autotuner searches (VSA_AUTOTUNE=full, not under the Triton interpreter)."""
    return os.environ.get("VSA_AUTOTUNE", "fast") == "full" and not _interpreting()


def _default(num_stages: int) -> triton.Config:
    # 4 warps; one stage under the interpreter, where speed is moot.
    return triton.Config({}, num_warps=4, num_stages=1 if _interpreting() else num_stages)


def fwd_default(pair: bool) -> triton.Config:
    """The forward kernel's default config."""
    return _default(2 if pair else 3)


def bwd_default(pair: bool) -> triton.Config:
    """The dQ and dK/dV kernels' default config."""
    return _default(2)


def fwd_configs() -> list:
    """The forward kernel's autotuner search (VSA_AUTOTUNE=full)."""
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


def bwd_configs() -> list:
    """The dQ and dK/dV kernels' autotuner search (VSA_AUTOTUNE=full)."""
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
