"""Agreement between ranks: one rank does file work, all ranks learn whether it failed (no rank hangs waiting)."""
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list


def on_main(accelerator: Accelerator, fn, *args, **kwargs):
    """Runs fn on the main process and returns its result on every rank; its exception is raised on every rank."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (re-raised below, on this rank as it was)
            error = err
    if accelerator.num_processes > 1:
        message = [None if error is None else f"{type(error).__name__}: {error}", result]
        broadcast_object_list(message)
        if not accelerator.is_main_process:
            if message[0] is not None:
                raise RuntimeError(f"rank 0 failed: {message[0]}")
            result = message[1]
    if error is not None:
        raise error
    return result
