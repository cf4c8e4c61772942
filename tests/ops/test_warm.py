"""ops/warm.py: while the kernel warm-up thread runs, other threads' VSA launches wait for it (first launches of a
Triton kernel from two threads at once are not safe); the op's entry points wait before their first launch."""
import threading
import warnings

import pytest
import torch
from ops_utils import DEVICE, ON_GPU, random_inputs

from vsa_train.ops import TileLayout, block_sparse_attention, video_sparse_attention_tiled, warm

LONG = 30.0  # seconds: what a call that should return may take on a loaded machine (it returns as soon as done)


def _blocked(fn, seconds=0.3) -> bool:
    """Whether fn() is still running after `seconds` (it is left to finish in its daemon thread)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive()


def _returns(fn) -> bool:
    return not _blocked(fn, LONG)


def _staged_warm_up():
    """A warm-up whose stages the test releases: (thread, [forward, end] events)."""
    stages = [threading.Event() for _ in range(2)]

    def compile_all(forward_ready):
        warm.wait(grad=True)  # its own thread never waits for itself
        stages[0].wait(LONG)
        forward_ready()
        stages[1].wait(LONG)

    return warm.start(compile_all), stages


def test_waits_block_until_the_warm_up_compiled_what_the_caller_needs():
    thread, stages = _staged_warm_up()
    assert _blocked(lambda: warm.wait(grad=False)) and _blocked(lambda: warm.wait(grad=True)) and _blocked(warm.join)
    stages[0].set()
    assert _returns(lambda: warm.wait(grad=False))  # an eval's forward may go
    assert _blocked(lambda: warm.wait(grad=True)) and _blocked(warm.join)  # training and forks still wait
    stages[1].set()
    assert _returns(lambda: warm.wait(grad=True)) and _returns(warm.join) and not thread.is_alive()
    assert _returns(warm.join) and _returns(lambda: warm.wait(grad=True))  # none running: at once


def test_a_failed_warm_up_releases_the_waiters(monkeypatch):
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))

    def compile_all(forward_ready):
        raise RuntimeError("boom")  # before saying its forward kernels are ready

    warm.start(compile_all)
    assert _returns(lambda: warm.wait(grad=False)) and _returns(lambda: warm.wait(grad=True)) and _returns(warm.join)
    assert [str(e) for e in died] == ["boom"]


def test_a_hung_warm_up_is_given_up_on_once(monkeypatch):
    monkeypatch.setattr(warm, "JOIN_TIMEOUT_S", 0.2)
    thread, stages = _staged_warm_up()
    with pytest.warns(UserWarning, match="not waiting for it any more") as record:
        warm.wait(grad=False)
    assert len(record) == 1
    monkeypatch.setattr(warm, "JOIN_TIMEOUT_S", 3600.0)  # a wait that still waited would now block for an hour
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        for wait in (lambda: warm.wait(grad=False), lambda: warm.wait(grad=True), warm.join):
            assert not _blocked(wait, 5.0)  # given up: no more waiting, for any kind of wait
    assert again == []  # and no second warning
    # A new warm-up is not released by the stale one ending: each has its own events.
    monkeypatch.setattr(warm, "JOIN_TIMEOUT_S", LONG)
    thread2, stages2 = _staged_warm_up()  # the stale thread was given up on: start() does not wait for it
    for event in stages:
        event.set()
    thread.join(LONG)
    assert _blocked(lambda: warm.wait(grad=False))
    for event in stages2:
        event.set()
    assert _returns(warm.join) and not thread2.is_alive()


@pytest.mark.parametrize("path", ["vsa", "block_sparse"])
def test_entry_points_wait_before_launching(monkeypatch, path):
    """Each entry point waits once before its first launch: for the forward kernels without gradient, for all with
    it; the backward adds no wait."""
    # Every launch (kernel[grid](...)) goes through the kernel object's run: a JITFunction's on the GPU, an
    # InterpretedFunction's in the CPU interpreter (what triton.jit returns under TRITON_INTERPRET=1).
    if ON_GPU:
        from triton.runtime.jit import JITFunction as Kernel
    else:
        from triton.runtime.interpreter import InterpretedFunction as Kernel

    launched, calls = [], []
    run = Kernel.run
    monkeypatch.setattr(Kernel, "run", lambda fn, *a, **k: (launched.append(fn.fn.__name__), run(fn, *a, **k))[1])
    monkeypatch.setattr(warm, "wait", lambda grad=True: calls.append((grad, list(launched))))
    layout = TileLayout((4, 8, 8))
    x = {n: t.float() for n, t in random_inputs(1, layout.padded_len, 1, 64, ("q", "k", "v"), seed=2,
                                                device=DEVICE).items()}
    sizes = layout.kv_tile_sizes(DEVICE)
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=torch.int32, device=DEVICE)[None, None]
    count = torch.full((1, 1, 4), 2, dtype=torch.int32, device=DEVICE)

    def op(**t):
        if path == "block_sparse":
            return block_sparse_attention(**t, q2k_index=index, q2k_count=count, kv_tile_sizes=sizes,
                                          backend="triton")[0]
        return video_sparse_attention_tiled(**t, layout=layout, topk=2, backend="triton")

    for grad in (False, True):
        launched.clear()
        calls.clear()
        with torch.set_grad_enabled(grad):
            out = op(**{n: t.detach().requires_grad_(grad) for n, t in x.items()})
        assert calls == [(grad, [])], calls  # nothing launched before the wait
        assert launched, "no launch recorded: one before the wait would go unseen"
    out.sum().backward()
    assert len(calls) == 1  # the backward added no wait
