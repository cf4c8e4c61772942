"""Helpers shared by the ops tests (import as `from ops_utils import ...`; pytest puts tests/ops on sys.path).

Also the one place that decides where the kernels under test run (DEVICE) and which dtypes and bounds they are
held to there (DOT_DTYPES, BF16_DOT, TOL).
"""
import pytest
import torch

from vsa_train.ops import KernelOptions

# The GPU when there is one (compiled kernels, as training runs them), else the CPU in Triton's interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported when CUDA is missing). Inputs are drawn
# on the CPU from seeded generators and then moved here, so both machines check the kernels on the same numbers.
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# bf16 through tl.dot runs on the GPU only: in Triton 3.9's CPU interpreter tl.dot on bf16 returns garbage (its
# fp16 and fp32 dots are sound), so there a bf16 attention case would test the interpreter, not the kernels.
# Kernels without a dot (pool.py, gating.py) take bf16 on both machines.
BF16_DOT = pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is wrong in Triton's CPU interpreter; runs on CUDA")
DOT_DTYPES = (torch.float32, torch.float16, *((torch.bfloat16,) if ON_GPU else ()))

# Bounds on rel_err of the attention kernels' outputs and gradients against float64 on the same rounded inputs.
# fp32 (IEEE dots, no tf32): a few thousand fp32 roundings (~1e-7), with a margin. fp16 (11 significant bits):
# O, P and dS are rounded to fp16 (~3e-4 each); 5e-3. bf16 keeps 8 significant bits, so each of those roundings
# is 8x fp16's: measured 1.4e-3 to 6.7e-3 on an H100 (docs/benchmarks.md, "VSA op: accuracy against float64"; the
# largest at 16x logits), so its bound is the op contract's 1e-2 (docs/design.md, "VSA: op contract"), not 5e-3.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||, computed in float64 (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def random_inputs(B, S, H, D, names=("q", "k", "v"), qk_scale=1.0, seed=0, device="cpu") -> dict:
    """float64 [B, S, H, D] normal tensors by name on device (drawn on the CPU: the same numbers on any device);
    q and k are multiplied by qk_scale (logits by its square)."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
                * (qk_scale if n in ("q", "k") else 1.0)).to(device) for n in names}


def output_and_grads(fn, inputs: dict, dtype: torch.dtype, seed=1):
    """fn(**inputs) on leaf copies cast to dtype, backpropagated from a fixed random cotangent.

    Returns (out, {name: grad}), so that two implementations (or two dtypes) can be compared value by value.
    """
    leaves = {n: x.to(dtype).requires_grad_() for n, x in inputs.items()}
    out = fn(**leaves)
    g = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    out.backward(cotangent)
    return out.detach(), {n: x.grad for n, x in leaves.items()}


# Every kernel output starts as NaN, so that an element a kernel fails to write fails the test.
POISON = KernelOptions(poison_outputs=True)
