"""What every Triton launcher of the op shares: the tile size, the kernel options, output allocation.

The options are one frozen object passed down explicitly (public function -> autograd Function -> launcher):
nothing in this package reads a module-level switch per call.
"""
import contextlib
from dataclasses import dataclass

import torch

try:  # the Triton kernels need it; the PyTorch backend (what "auto" runs on CPU) does not, so it is optional
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

__all__ = ["BLOCK", "DEFAULT_OPTIONS", "HAVE_TRITON", "NO_TRITON", "KernelOptions"]

# Why backend="triton" cannot run here, for the errors that say so (pyproject.toml: triton is no dependency).
NO_TRITON = "the triton package, which is not installed: `pip install triton` (torch's CUDA build brings it)"

# Rows of a padded tile = rows of one kernel block. The Triton backend needs prod(tile) == BLOCK; the tiling
# (tiling.py) and the PyTorch reference take any tile.
BLOCK = 64


@dataclass(frozen=True)
class KernelOptions:
    """How the Triton kernels run. The defaults are what training runs; tests and benchmarks pass others.

    center_keys: the backward's dQ multiplies dS by keys centred by their per-(batch, head) mean, exact for any
        shift and well-conditioned when keys share a large offset (docs/design.md, "dQ with centred keys").
    tile_pairs: two 64-row tiles per kernel loop iteration (64 x 128 products, half the iterations); None: at
        head dim 64 only, where pairs are faster (at 128 they spill registers; docs/design.md). The two differ
        by rounding only (another summation order).
    poison_outputs: allocate every kernel output filled with NaN, so that a test sees an element no kernel wrote.
    """

    center_keys: bool = True
    tile_pairs: bool | None = None
    poison_outputs: bool = False

    def __post_init__(self):
        for name in ("center_keys", "poison_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KernelOptions.{name} must be a bool, got {getattr(self, name)!r}")
        if self.tile_pairs is not None and not isinstance(self.tile_pairs, bool):
            raise TypeError(f"KernelOptions.tile_pairs must be a bool or None, got {self.tile_pairs!r}")

    def pairs(self, head_dim: int) -> bool:
        """Whether the attention kernels take two tiles per loop iteration at this head dim."""
        return head_dim == 64 if self.tile_pairs is None else self.tile_pairs


DEFAULT_OPTIONS = KernelOptions()


def check_options(options) -> KernelOptions:
    """options, or the defaults for None; a clear error for anything else."""
    if options is None:
        return DEFAULT_OPTIONS
    if not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a KernelOptions or None, got {type(options).__name__}")
    return options


def new_output(shape, dtype: torch.dtype, device: torch.device, poison: bool) -> torch.Tensor:
    """An uninitialised kernel output, or one filled with NaN when poison is set (KernelOptions.poison_outputs)."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(t: torch.Tensor):
    """Context that makes t's CUDA device current (a no-op on the CPU)."""
    # Triton launches on the current CUDA device, which need not be the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def eager_or_registered(impl, op):
    """impl in eager mode; under torch.compile the custom op registered around it, which the compiler keeps
    opaque (it cannot trace the launchers). The same function runs either way: eager skips only the
    dispatcher's per-call cost, which made the op host-bound at 16K tokens."""
    return op if torch.compiler.is_compiling() else impl
