"""ops/warm.py: while the kernel warm-up thread runs, other threads' VSA launches wait for it (first launches of a
Triton kernel from two threads at once are not safe); the op's entry points ask with the right gradient flag."""
import math
import threading

import pytest
import torch
from ops_utils import random_inputs

from vsa_train.ops import TileLayout, block_sparse_attention, video_sparse_attention_tiled, vsa, warm


def _blocked(fn, seconds=0.3) -> bool:
    """Whether fn() is still running after `seconds` (it is left to finish in its thread)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive()


def test_wait_blocks_until_the_warm_up_compiled_what_the_caller_needs():
    forward_done, finish = threading.Event(), threading.Event()
    inside = []

    def compile_all(forward_ready):
        warm.wait(grad=True)  # its own thread never waits for itself
        forward_done.wait(5)
        forward_ready()
        finish.wait(5)
        inside.append("done")

    thread = warm.start(compile_all)
    assert _blocked(lambda: warm.wait(grad=False))
    assert _blocked(lambda: warm.wait(grad=True))
    forward_done.set()
    assert not _blocked(lambda: warm.wait(grad=False))  # an eval's forward may go
    assert _blocked(lambda: warm.wait(grad=True))  # training still waits
    finish.set()
    warm.wait(grad=True)
    assert not thread.is_alive() and inside == ["done"]
    warm.wait(grad=True)  # none running: returns at once


def test_a_failed_warm_up_releases_the_waiters(monkeypatch):
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))

    def compile_all(forward_ready):
        raise RuntimeError("boom")  # the thread dies before saying its forward kernels are ready

    warm.start(compile_all)
    assert not _blocked(lambda: warm.wait(grad=False))
    warm.wait(grad=True)
    assert [str(e) for e in died] == ["boom"]


def test_a_hung_warm_up_is_given_up_on(monkeypatch):
    monkeypatch.setattr(warm, "JOIN_TIMEOUT_S", 0.2)
    release = threading.Event()
    warm.start(lambda forward_ready: (forward_ready(), release.wait(5)))
    with pytest.warns(UserWarning, match="not waiting for it any more"):
        warm.wait(grad=True)
    release.set()


@pytest.mark.parametrize("path", ["eager", "custom_ops", "block_sparse"])
def test_entry_points_wait_before_launching(monkeypatch, path):
    """Each entry point waits once per call before its first launch: for the forward kernels without gradient,
    for everything with it (the custom-op path's pooling asks for the forward ones, its fine stage for all)."""
    calls = []
    monkeypatch.setattr(warm, "wait", lambda grad=True: calls.append(grad))
    monkeypatch.setattr(vsa, "EAGER_FUNCTION", path == "eager")
    layout = TileLayout((4, 8, 8))
    x = {n: t.float() for n, t in random_inputs(1, layout.padded_len, 1, 64, ("q", "k", "v"), seed=2).items()}
    sizes = layout.kv_tile_sizes("cpu")
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=torch.int32)[None, None]
    count = torch.full((1, 1, 4), 2, dtype=torch.int32)

    def op(**t):
        if path == "block_sparse":
            return block_sparse_attention(**t, q2k_index=index, q2k_count=count, kv_tile_sizes=sizes,
                                          backend="triton")[0]
        return video_sparse_attention_tiled(**t, layout=layout, topk=2, backend="triton")

    with torch.no_grad():
        op(**x)
    expected = {"eager": [False], "custom_ops": [False, False], "block_sparse": [False]}[path]
    assert calls == expected
    calls.clear()
    out = op(**{n: t.requires_grad_() for n, t in x.items()})
    assert calls == {"eager": [True], "custom_ops": [False, True], "block_sparse": [True]}[path]
    out.sum().backward()  # the backward needs no wait of its own: its forward waited for everything
    assert len(calls) == len(expected) and math.isfinite(x["q"].grad.sum().item())
