"""The background compile of the VSA kernels (models/vsa.py `warm_up_kernels`), and the waits for it.

Two threads must not launch one Triton kernel for the first time together: the autotuner keeps per-call state on
the shared kernel object, and a kernel's first load is not thread-safe. So while a warm-up runs, the op's entry
points in any other thread wait (`wait`): before a forward without gradient (an eval) for its forward kernels,
before one with gradient for all of it, backward kernels included. The entry points are the forward bodies of
the two autograd Functions (vsa_function.vsa_forward, block_sparse/function.block_sparse_forward), at run time in
eager and compiled mode alike. The warm-up runs its own backward in its own thread (not on the autograd engine's device thread), so a
wait on that thread (a forward recomputed in a backward) cannot block it. Before forking (data-loader workers),
`join` waits for the thread's end. A warm-up that hangs is given up on once, with a warning, after JOIN_TIMEOUT_S:
kernels then compile at first use.
"""
import threading
import warnings

JOIN_TIMEOUT_S = 300.0  # far above a warm-up (seconds), below train.dist_timeout_s's default 600


class _WarmUp:
    """One warm-up: its thread and how far it got (its own events: a stale one cannot release another's waiters)."""

    def __init__(self):
        self.forward = threading.Event()  # the forward kernels without gradient are compiled
        self.done = threading.Event()     # all are (or it failed)
        self.gave_up = False
        self.thread: threading.Thread | None = None


_current: _WarmUp | None = None


def start(compile_all) -> threading.Thread:
    """Runs compile_all(forward_ready) in a daemon thread, the process's one warm-up (after any earlier one ended).
    compile_all calls forward_ready() once the forward kernels without gradient are compiled; its end counts as that."""
    global _current
    join()
    warm_up = _WarmUp()

    def run():
        try:
            compile_all(warm_up.forward.set)
        finally:
            warm_up.forward.set()
            warm_up.done.set()

    warm_up.thread = threading.Thread(target=run, name="vsa-kernel-warm-up", daemon=True)
    _current = warm_up
    warm_up.thread.start()
    return warm_up.thread


def wait(grad: bool = True) -> None:
    """Returns once a running warm-up compiled the forward kernels without gradient (grad False) or all its kernels
    (grad True); at once in the warm-up's own thread, when none runs, or once it was given up on."""
    warm_up = _current
    if warm_up is None or warm_up.gave_up or threading.current_thread() is warm_up.thread:
        return
    if not (warm_up.done if grad else warm_up.forward).wait(JOIN_TIMEOUT_S):
        _give_up(warm_up)


def join() -> None:
    """Returns once the warm-up's thread ended (or was given up on): call before forking."""
    global _current
    warm_up = _current
    if warm_up is None or warm_up.gave_up or threading.current_thread() is warm_up.thread:
        return
    warm_up.thread.join(JOIN_TIMEOUT_S)
    if warm_up.thread.is_alive():
        _give_up(warm_up)
    elif _current is warm_up:
        _current = None


def _give_up(warm_up: _WarmUp) -> None:
    if not warm_up.gave_up:
        warm_up.gave_up = True
        warnings.warn(f"the VSA kernel warm-up has run for over {JOIN_TIMEOUT_S:.0f} s; not waiting for it any more "
                      f"(kernels compile at first use)", stacklevel=3)
