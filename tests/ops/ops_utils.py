"""Helpers shared by the ops tests (import as `from ops_utils import ...`; pytest puts tests/ops on sys.path)."""
import torch

from vsa_train.ops import KernelOptions


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||, computed in float64 (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def random_inputs(B, S, H, D, names=("q", "k", "v"), qk_scale=1.0, seed=0) -> dict:
    """float64 [B, S, H, D] normal tensors by name; q and k are multiplied by qk_scale (logits by its square)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, S, H, D, generator=g, dtype=torch.float64) * (qk_scale if n in ("q", "k") else 1.0)
            for n in names}


def output_and_grads(fn, inputs: dict, dtype: torch.dtype, seed=1):
    """fn(**inputs) on leaf copies cast to dtype, backpropagated from a fixed random cotangent.

    Returns (out, {name: grad}), so that two implementations (or two dtypes) can be compared value by value.
    """
    leaves = {n: x.to(dtype).requires_grad_() for n, x in inputs.items()}
    out = fn(**leaves)
    g = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    out.backward(cotangent)
    return out.detach(), {n: x.grad for n, x in leaves.items()}


# Every kernel output starts as NaN, so that an element a kernel fails to write fails the test.
POISON = KernelOptions(poison_outputs=True)
