"""Saving the whole training state as a checkpoint (format.py says what the files are).

Files are portable: full (unsharded) weights and optimizer state gathered on the main process, each rank's RNG
state in its own file. A save first copies the state into host memory (the only part that holds training up),
then writes, checksums and publishes the files, in a background thread when asked (`Checkpointer`). Saving is
collective (every rank calls it).
"""
import copy
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from ..distributed import on_main
from ..files import disk_error
from ..parallel import is_fsdp
from .format import STATE, optimizer_to_files, rng_file, rng_state, save_tensors, tensor_bytes, write_json
from .store import Checkpoints


class HostBuffers:
    """Host copies of the state's tensors, in buffers kept from one save to the next (pinned under CUDA, so the
    device-to-host copy runs at full speed and allocation is paid once)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._error: Exception | None = None

    def copy(self, tree, keep: bool = True, prefix: str = ""):
        """`tree` (dicts, lists, tuples, tensors, plain values) with every tensor copied to the host and every other
        value deep-copied (param_groups' lr changes in place each step). A DTensor (an FSDP shard) is gathered
        whole first, a collective: every rank walks the same tree in the same order, and those with `keep=False`
        drop what they gathered (None). A copy that fails (host memory) does not stop the walk, so the other
        ranks' gathers still find a partner; the error is raised at its end."""
        self._error = None
        out = self._walk(tree, keep, prefix)
        if self._error is not None:
            raise self._error
        return out

    def _walk(self, tree, keep: bool, prefix: str):
        if isinstance(tree, torch.Tensor):
            if isinstance(tree, DTensor):
                tree = tree.full_tensor()  # one tensor at a time: device memory for one full tensor, not all
            if not keep or self._error is not None:
                return None
            try:
                return self._copy(prefix, tree.detach())
            except Exception as err:  # noqa: BLE001 (raised by `copy` once the walk is done)
                self._error = err
                return None
        if isinstance(tree, dict):
            return {k: self._walk(v, keep, f"{prefix}/{k}") for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._walk(v, keep, f"{prefix}/{i}") for i, v in enumerate(tree))
        return copy.deepcopy(tree) if keep else None

    def _copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            try:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            except RuntimeError:  # no page-locked memory left: an ordinary buffer, copied at pageable speed
                buf = torch.empty(t.shape, dtype=t.dtype)
            self._buffers[key] = buf
        buf.copy_(t, non_blocking=t.is_cuda)  # synchronised once, by `Checkpointer.save`
        return buf


class Checkpointer:
    """Writes step_<N> checkpoints: `save` copies the state to the host and, with `background`, returns while a
    thread writes, checksums and publishes the files; one save is in flight at a time, and `wait` (collective)
    ends it and raises its error on every rank."""

    def __init__(self, accelerator: Accelerator, checkpoints: Checkpoints, keep: int, announce=None):
        self.accelerator, self.checkpoints, self.keep = accelerator, checkpoints, keep
        self.announce = announce or (lambda message: None)  # the main process's printer
        self._host = HostBuffers()
        self._thread: threading.Thread | None = None
        self._outcome: tuple[Path | None, BaseException | None] = (None, None)

    def save(self, model, optimizer, ema, counters: dict, background: bool = False, stop: bool = False) -> Path | None:
        """Saves step `counters["step"]`; returns its directory, or None while it is written in the background.
        A `stop` save (a signal's) is tried even when the save before it failed: that error is printed instead."""
        try:
            self.wait()
        except Exception as err:  # noqa: BLE001 (raised on every rank alike, so every rank goes on alike)
            if not stop:
                raise
            self.announce(f"the previous checkpoint failed ({err}); saving this one anyway")
        accelerator, step, started = self.accelerator, counters["step"], time.perf_counter()
        tmp = self.checkpoints.tmp_dir(step)  # publish replaces a damaged step_<N> of the same step
        state, error = None, None
        try:  # the host copy (rank 0; collective under FSDP), then the folder: a failure is every rank's
            state = self._snapshot(model, optimizer, ema, counters)
            if accelerator.is_main_process:
                _fresh_dir(tmp)
        except Exception as err:  # noqa: BLE001 (host memory, disk): raised below, after every rank knows
            error = err
        self._agree(error, tmp, "could not copy the state or make the checkpoint folder")
        rng = rng_state()
        try:  # every rank its own RNG state
            save_tensors(rng, rng_file(tmp, accelerator.process_index))
        except OSError as err:
            error = disk_error(err, tmp, needed=tensor_bytes([rng, state]))
        self._agree(error, tmp, f"could not write its RNG state into {tmp}")
        if not accelerator.is_main_process:
            return None if background else self.wait()
        held = time.perf_counter() - started

        def write() -> None:
            try:
                _write_files(state, tmp)
                path = self.checkpoints.publish(step, self.keep)
                self._outcome = (path, None)
                self.announce(f"saved checkpoint step {step} in {time.perf_counter() - started:.1f} s"
                              + (f" (training held for {held:.1f} s)" if background else ""))
            except BaseException as err:  # noqa: BLE001 (raised by `wait`, on every rank)
                if not background and not isinstance(err, Exception):
                    raise  # Ctrl-C or exit in the main thread: as anywhere else in the loop
                # `on_main` shares an Exception with the other ranks; anything else would leave them waiting.
                self._outcome = (None, err if isinstance(err, Exception) else RuntimeError(f"interrupted: {err!r}"))
                if background:  # the error itself reaches the user once: raised by `wait`, or printed by a stop
                    self.announce(f"checkpoint step {step} failed; the run stops with its error")

        self._outcome = (None, None)
        if not background:
            write()
            return self.wait()
        # The trainer's `close` waits for this thread on a crash, inside the run's lock: at interpreter shutdown
        # it could no longer start the threads that write and hash the files.
        self._thread = threading.Thread(target=write, name=f"checkpoint-step-{step}")
        self._thread.start()
        return None

    def _agree(self, error: Exception | None, tmp: Path, what: str) -> None:
        """Raises on every rank if any rank failed (collective), after rank 0 removed the partial folder."""
        failed = self.accelerator.reduce(torch.tensor(float(error is not None), device=self.accelerator.device),
                                         "sum").item()
        if failed:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error or RuntimeError(f"another rank {what}")

    def failed(self) -> bool:
        """A background save here has failed and `wait` has not raised its error yet (this process only)."""
        thread, (_, error) = self._thread, self._outcome
        return thread is not None and not thread.is_alive() and error is not None

    def wait(self) -> Path | None:
        """Ends the save in flight (collective): its directory on every rank, or its error raised on every rank."""
        return on_main(self.accelerator, self.join)

    def join(self) -> Path | None:
        """This process's part of `wait`, without the collective (for a crash path: other ranks may be gone)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        (path, error), self._outcome = self._outcome, (None, None)
        if error is not None:
            raise error
        return path

    def close(self) -> None:
        """On the way out of a crash: lets the save in flight finish (inside the run's lock); its error is printed,
        not raised over the one being handled."""
        try:
            self.join()
        except KeyboardInterrupt:
            print("interrupted while a checkpoint was written: it may not be published", flush=True)
        except BaseException as err:  # noqa: BLE001
            print(f"the checkpoint being written failed too: {err}", flush=True)

    def _snapshot(self, model, optimizer, ema, counters: dict) -> dict | None:
        """The state to write, in host memory the training does not touch (None off the main process)."""
        main = self.accelerator.is_main_process
        if not (main or is_fsdp(model)):  # unsharded: rank 0 holds all of it
            return None
        # This process's own tensors (FSDP shards under FSDP, gathered whole by `copy` on every rank), keyed by
        # parameter name; torch.distributed.checkpoint's cpu_offload gather would copy them to pageable memory
        # one synchronous copy at a time (~15 s for dit_1b's 17.5 GB on an H200), these buffers take ~0.4 s.
        state = self._host.copy({"model": get_model_state_dict(model),
                                 "optimizer": get_optimizer_state_dict(model, optimizer)}, keep=main)
        if not main:
            return None
        state["ema"] = self._host.copy(ema.module.state_dict(), prefix="ema") if ema is not None else None
        state["counters"] = copy.deepcopy(counters)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies have landed
        return state


def _fresh_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise disk_error(err, tmp) from err


def _write_files(state: dict, tmp: Path) -> None:
    """The main process's files of a checkpoint, the large ones written by threads at once (safetensors releases
    the GIL); on an error the folder is removed."""
    jobs = [lambda: save_tensors(state["model"], tmp / "model.safetensors"),
            lambda: optimizer_to_files(state["optimizer"], tmp)]
    if state.get("ema") is not None:
        jobs.append(lambda: save_tensors(state["ema"], tmp / "ema.safetensors"))
    try:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()
        write_json(state["counters"], tmp / STATE)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)  # before the free space is measured: the space it would leave
        raise disk_error(err, tmp, needed=tensor_bytes(state)) from err
