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

    def exit_for_requeue(self, checkpoint, signum: int | None = None) -> None:
        """After the checkpoint is saved: hands the signal to the handler we replaced (submitit), then exits.
        `signum` is the signal the ranks agreed on: a rank that received none stops for another rank's."""
        own = self.received is not None
        stopped_by = self.received if own else (signum or signal.SIGTERM)
        previous = self._previous.get(stopped_by)
        self.__exit__()
        self._ignore_while_leaving()
        if callable(previous) and stopped_by != signal.SIGINT:
            previous(stopped_by, None)  # submitit: requeue the job (rank 0) and exit
        where = "" if own else " (received by another rank)"
        print(f"stopped by {signal.Signals(stopped_by).name}{where}; resume from {checkpoint} by re-running the "
              f"same command (exit code {REQUEUE_EXIT_CODE})", file=sys.stderr, flush=True)
        raise SystemExit(REQUEUE_EXIT_CODE)

    @staticmethod
    def _ignore_while_leaving() -> None:
        """The checkpoint is written and this process is on its way out with 75. torchrun sends SIGTERM to the ranks
        still running as soon as one exits non-zero: a rank one step slower to leave would die of it (-15) instead
        of exiting 75. (A second Ctrl-C still exits at once: SIGINT keeps the handler restored above.)"""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if sig != signal.SIGINT:
                    signal.signal(sig, signal.SIG_IGN)
