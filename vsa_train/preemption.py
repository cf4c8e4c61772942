"""Stop requests from the cluster: SIGTERM, SIGUSR1, SIGUSR2 and the first SIGINT finish the step, save and exit.

The handler only records the signal; the trainer asks `requested()` once per optimizer step, all ranks agree on
the step (an all-reduce), save a checkpoint together and leave through `exit_for_requeue`. A second SIGINT
exits at once (KeyboardInterrupt). Under submitit the handler it replaced (submitit's, which requeues the SLURM
job from rank 0; submitit >= 1.5 asks SLURM for SIGUSR2 before the time limit) is called after the checkpoint is
written, so a timed-out job is requeued with its state saved.
"""
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the checkpoint of the step it stopped at is written


class StopSignals:
    """Context manager that turns stop signals into a request the training loop honours between steps."""

    def __init__(self, announce=print):
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._announce = announce

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: exiting without a checkpoint")
        if self.received is None:
            self.received = signum
            self._announce(f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, "
                           f"then exiting for requeue (Ctrl-C again to exit at once)")

    def requested(self) -> bool:
        return self.received is not None

    def exit_for_requeue(self, checkpoint) -> None:
        """After the checkpoint is saved: hands the signal to the handler we replaced (submitit), then exits."""
        previous = self._previous.get(self.received)
        self.__exit__()
        if callable(previous) and self.received != signal.SIGINT:
            previous(self.received, None)  # submitit: requeue the job (rank 0) and exit
        print(f"stopped by {signal.Signals(self.received).name}; resume from {checkpoint} by re-running the same "
              f"command (exit code {REQUEUE_EXIT_CODE})", file=sys.stderr, flush=True)
        raise SystemExit(REQUEUE_EXIT_CODE)
