"""Agreement between ranks: one rank does file work, all ranks learn whether it failed (no rank hangs waiting)."""
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .errors import LaunchError


def on_main(accelerator: Accelerator, fn, *args, **kwargs):
    """Runs fn on the main process and returns its result on every rank; its exception is raised on every rank (an
    expected one, errors.LaunchError, as a LaunchError: each rank then says why in one line)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (re-raised below, on this rank as it was)
            error = err
    if accelerator.num_processes > 1:
        message = [None if error is None else f"{type(error).__name__}: {error}", result,
                   isinstance(error, LaunchError)]
        broadcast_object_list(message)
        if not accelerator.is_main_process:
            if message[0] is not None:
                raise (LaunchError if message[2] else RuntimeError)(f"rank 0 failed: {message[0]}")
            result = message[1]
    if error is not None:
        raise error
    return result


# Default process groups that were shut down, kept to the end of the process (see leave_together).
_RETIRED: list = []


def leave_together(accelerator: Accelerator) -> None:
    """Waits for every rank, then shuts the default process group down without freeing its object.

    Freeing a gloo group joins its worker threads while this thread holds the GIL; a worker still releasing the
    Python tensors of a just-finished collective needs the GIL to do so: a deadlock, seen under load on 2 CPUs
    (py-spy: the main thread in ~ProcessGroupGloo's join, a worker in ~AsyncBroadcastWork waiting for the GIL).
    Kept to interpreter exit, the object is freed when its workers have long been idle.
    """
    if not torch.distributed.is_initialized():
        return
    accelerator.wait_for_everyone()  # under srun, rank 0 hosts the rendezvous store: no rank leaves early
    _RETIRED.append(torch.distributed.group.WORLD)
    torch.distributed.destroy_process_group()
