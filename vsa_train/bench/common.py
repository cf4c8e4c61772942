"""What the op benchmarks share: the CPU smoke switch, the device, errors, option labels, the card line."""
import argparse
import os
from pathlib import Path

import torch

from ..ops import KernelOptions

# SMOKE=1 (with TRITON_INTERPRET=1): tiny sizes on the CPU, every code path in seconds, no meaningful numbers.
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's Hydra configs
SMOKE = os.environ.get("SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (op's --batch, goals' --op-batch)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return int(text)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def pair_options(text: str) -> list[KernelOptions]:
    """--pairs "0,1" -> the KernelOptions to run the Triton rows with (one 64-row tile per kernel loop iteration,
    two); "" -> the defaults alone."""
    if not text:
        return [KernelOptions()]
    if not set(text.split(",")) <= {"0", "1"}:
        raise argparse.ArgumentTypeError(f"a comma-separated list of 0 and 1, got {text!r}")
    return [KernelOptions(tile_pairs=p == "1") for p in text.split(",")]


def options_label(options: KernelOptions, labelled: bool) -> str:
    """The suffix that tells a row's tile pairing apart ("" when --pairs was not given)."""
    return f" (pairs={int(options.tile_pairs)})" if labelled else ""


def require_device(tool: str) -> None:
    """Exits with a clear message where the tool cannot run: no GPU, or SMOKE=1 without the Triton interpreter."""
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit(f"vsa_train.bench {tool} needs a CUDA GPU (or SMOKE=1 with TRITON_INTERPRET=1 for a CPU "
                         f"smoke run)")
    if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("SMOKE=1 runs the Triton kernels on the CPU: set TRITON_INTERPRET=1 too")


def versions() -> dict:
    """{card, torch, triton, smoke}: what a result was measured on."""
    import triton

    if SMOKE:
        name = "CPU smoke run (Triton interpreter)"
    else:
        name = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return {"card": name, "torch": torch.__version__, "triton": triton.__version__, "smoke": SMOKE}


def card() -> str:
    """'<card> (<memory> GiB), torch X, triton Y': the first line of every GPU table."""
    v = versions()
    return f"{v['card']}, torch {v['torch']}, triton {v['triton']}"
