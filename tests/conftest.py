"""Test setup: without a GPU, Triton kernels run in its interpreter (must be set before triton is imported).

pyproject.toml's addopts run the suite on 2 pytest-xdist workers (`-n 2 --dist loadgroup`; `-n 0` runs it in this
process, as before). In a worker:
- one intra-op thread (OMP_NUM_THREADS=1, inherited by the subprocesses a test starts without a thread count of its
  own): two workers of 2 threads each would oversubscribe 2 cores;
- torchrun is --standalone (PET_STANDALONE=1): a rendezvous on a free port. Without a port torch 2.13 picks a free
  one too, but torch 2.11 (the low end of the range, .ci/torch_range) takes 127.0.0.1:29500, where two workers'
  runs at once would collide.
Tests that must share one process, or one thing outside it, carry an `xdist_group` mark: the SLURM tests (one local
cluster with a CPU per core), the README commands (a run family's later commands use its first one's run), and tests
sharing an expensive module-scoped fixture (which each worker would otherwise build again)."""
import os

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
ONE_THREAD_PER_WORKER = bool(WORKER) and "OMP_NUM_THREADS" not in os.environ
if ONE_THREAD_PER_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
if WORKER:
    os.environ.setdefault("PET_STANDALONE", "1")

import torch  # noqa: E402

if ONE_THREAD_PER_WORKER:
    torch.set_num_threads(1)  # in case torch was imported before this file

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
