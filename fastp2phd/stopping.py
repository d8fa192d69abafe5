"""Stopping a one-process training run between steps.

The first Ctrl-C (SIGINT), or SIGTERM (what a cluster's scheduler sends before it preempts a job), lets the step in
progress finish; the run then saves a checkpoint it resumes from exactly, also where the signal ended the loader's
workers with it (a scheduler signals the whole process group). A second one stops at once, as before
(the last save stays whole: saves are atomic). Under torchrun every process would have to agree on the step to stop
after, so there signals act as before.
"""
from __future__ import annotations

import contextlib
import signal
import threading

from .errors import Pix2PixHDError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Pix2PixHDError, RuntimeError):
    """The run stopped between steps on a signal and saved; ``signal`` is the one received."""

    def __init__(self, message: str, signum: signal.Signals):
        super().__init__(message)
        self.signal = signum


class StopRequest:
    signal: signal.Signals | None = None  # the first stop signal received, if any


@contextlib.contextmanager
def stop_between_steps(say, enabled: bool = True):
    """Inside, a first SIGINT or SIGTERM is recorded in the ``StopRequest`` yielded (and said), a second raises
    KeyboardInterrupt. Disabled, or off the main thread (where Python takes no handlers), signals act as they did."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    muted: dict = {}

    def handle(signum, frame):
        if request.signal is not None:
            raise KeyboardInterrupt
        request.signal = signal.Signals(signum)
        # A scheduler's SIGTERM reaches the loader workers too, and torch's SIGCHLD handler would raise from
        # wherever the step is when one ends: the step is to finish (the run saves when the loader fails next).
        muted[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        say(f"{request.signal.name}: stopping after this step, to save it (Ctrl-C again stops at once, keeping the "
            "last save)")

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in (previous | muted).items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def ignore_ctrl_c(worker_id: int = 0) -> None:
    """A data loader worker's start: a terminal's Ctrl-C reaches the whole process group, and a worker it ended
    would break the batch the main process waits for; the main process ends its workers itself. (SIGTERM still
    ends a worker: the loader's own shutdown sends it to one that does not stop.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
