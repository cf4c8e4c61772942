"""The background compile of the VSA kernels (models/vsa.py `warm_up_kernels`), and the wait for it.

Two threads must not launch one Triton kernel for the first time together: the autotuner keeps per-call state on
the shared kernel object, and a kernel's first load is not thread-safe. So while a warm-up runs, the op's entry
points in any other thread wait (`wait`): for its forward kernels before a forward without gradient (an eval), for
all of it before anything that will need the backward. The entry points are the eager Function (eager.py) and
the first custom op of each traced path (pool.tile_means, block_sparse op.block_sparse_fwd), at run time only.
"""
import threading
import warnings

JOIN_TIMEOUT_S = 600.0  # far above a warm-up (~10 s on an H200 machine)

_thread: threading.Thread | None = None  # the warm-up running or last run
_forward = threading.Event()  # set once the warm-up's forward kernels are compiled (or it ended)


def start(compile_all) -> threading.Thread:
    """Runs compile_all(forward_ready) in a daemon thread, the process's one warm-up (after any earlier one ends).

    compile_all calls forward_ready() once the kernels of a forward without gradient are compiled; if it returns
    or raises before, its end counts as that.
    """
    global _thread
    wait(grad=True)
    _forward.clear()

    def run():
        try:
            compile_all(_forward.set)
        finally:
            _forward.set()

    _thread = threading.Thread(target=run, name="vsa-kernel-warm-up", daemon=True)
    _thread.start()
    return _thread


def wait(grad: bool = True) -> None:
    """Returns once a running warm-up's forward kernels (grad False) or all its kernels (grad True) are compiled;
    at once in the warm-up's own thread or when none runs. Also to call before forking (data-loader workers)."""
    global _thread
    thread = _thread
    if thread is None or thread is threading.current_thread():
        return
    if not grad:
        _forward.wait(JOIN_TIMEOUT_S)
        return
    thread.join(timeout=JOIN_TIMEOUT_S)
    if thread.is_alive():  # hung: compiling at first use beats waiting forever
        warnings.warn(f"the VSA kernel warm-up has run for over {JOIN_TIMEOUT_S} s; not waiting for it any more",
                      stacklevel=2)
    if _thread is thread:
        _thread = None
