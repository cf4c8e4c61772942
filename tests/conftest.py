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
