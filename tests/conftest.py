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


@pytest.fixture
def die_in_step(monkeypatch):
    """die_in_step(n): the n-th trainer.train_step call from now raises KeyboardInterrupt (a process killed in that
    step); returns a function that puts the real step back (for a resume in the same test)."""
    from vsa_train import trainer

    real_step = trainer.train_step

    def arm(n: int):
        calls = []

        def dies(run, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt(f"killed in step {n}")
            return real_step(run, *args, **kwargs)

        monkeypatch.setattr(trainer, "train_step", dies)
        return lambda: monkeypatch.setattr(trainer, "train_step", real_step)

    return arm
