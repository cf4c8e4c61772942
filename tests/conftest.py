"""Test setup: without a GPU, Triton kernels run in its interpreter (must be set before triton is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo's cache and its automatic-dynamic-shape marks are per code object,
    so shapes seen by one test's compiled model would otherwise make another test's trace symbolic."""
    torch._dynamo.reset()
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run fastest so on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
