"""Stop requests from the cluster: SIGTERM, SIGUSR1, SIGUSR2 and the first SIGINT finish the step, save and exit.

The handler only records the signal, from the start of a launch on; the trainer asks at its safe points: once
the run is built, after each eval batch and once per optimizer step. All ranks agree there (an all-reduce of
`slots`, read back by `agreed`), save a checkpoint together if this launch trained and leave through
`exit_for_requeue`. A second SIGINT exits at once (KeyboardInterrupt). Under submitit the handler it replaced
(submitit's, which requeues the SLURM job from rank 0; submitit >= 1.5 asks SLURM for SIGUSR2 before the time
limit) is called after the checkpoint is written, so a timed-out job is requeued with its state saved.
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
        self.announce = announce  # the trainer hands it its progress bar's printer once the loop starts

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
            self.announce(f"received {signal.Signals(signum).name}: stopping at the end of this step (or eval "
                          f"batch, or build), saving a checkpoint if this launch trained, then exiting for requeue "
                          f"(Ctrl-C again to exit at once)")

    def requested(self) -> bool:
        return self.received is not None

    def exit_for_requeue(self, checkpoint, signum: int | None = None) -> None:
        """After the checkpoint is saved (None: nothing to resume from, the launch stopped before training): hands
        the signal to the handler we replaced (submitit), then exits. `signum` is the signal the ranks agreed on: a
        rank that received none stops for another rank's."""
        own = self.received is not None
        stopped_by = self.received if own else (signum or signal.SIGTERM)
        previous = self._previous.get(stopped_by)
        self.__exit__()
        self._ignore_while_leaving()
        if callable(previous) and stopped_by != signal.SIGINT:
            previous(stopped_by, None)  # submitit: requeue the job (rank 0) and exit
        where = "" if own else " (received by another rank)"
        then = (f"resume from {checkpoint} by re-running the same command" if checkpoint is not None else
                "nothing was trained or saved: re-running the same command starts the run")
        print(f"stopped by {signal.Signals(stopped_by).name}{where}; {then} (exit code {REQUEUE_EXIT_CODE})",
              file=sys.stderr, flush=True)
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


def slots(received: int | None) -> list[float]:
    """One slot per stop signal, 1 for the one this rank received: summed over ranks (an all-reduce), every rank
    learns whether to stop and for which signal (`agreed`)."""
    return [float(sig == received) for sig in SIGNALS]


def agreed(counts) -> int:
    """The signal that stops every rank (the first of SIGNALS any rank received), from the summed `slots`; 0: none."""
    return next((int(sig) for sig, count in zip(SIGNALS, counts) if count), 0)
