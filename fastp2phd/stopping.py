"""Stopping a training run between steps.

The first Ctrl-C (SIGINT), or SIGTERM (what a cluster's scheduler sends before it preempts a job), lets the step in
progress finish; the run then saves a checkpoint it resumes from exactly. A second Ctrl-C stops at once, as before
(the last save stays whole: saves are atomic); another SIGTERM does not, as a job's processes may get several (Slurm
signals every process of a job, and torchrun passes its own on). Under torchrun (whose agent passes a SIGTERM or
Ctrl-C on to its processes as SIGTERM, and kills them 30 s later) the processes agree on the step to stop after
(``StopAgreement``). A terminal, a scheduler and torchrun signal a whole process group, so the data loader's workers
ignore these signals while the run takes their batches (``LoaderWorkerSignals``): it needs its next batch to finish
its step.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from typing import Callable, NoReturn

from .errors import Pix2PixHDError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Pix2PixHDError, RuntimeError):
    """The run stopped between steps on a signal and saved; ``signal`` is the one received."""

    def __init__(self, message: str, signum: signal.Signals):
        super().__init__(message)
        self.signal = signum


class StopRequest:
    signal: signal.Signals | None = None  # the first stop signal received, if any


class StopAgreement:
    """Under torchrun every process stops after the same step, as a save takes all of them. The first to get a stop
    signal writes the step two past its own into the process group's store, and each process reads it after every
    step: DDP's gradient all-reduce, and the step's wait for its losses, keep the processes within a step of each
    other, so each reads it in time. A round trip to the store a step; no collective, no wait for the GPU."""

    def __init__(self, store, key: str, store_lost: Callable[[], NoReturn] | None = None):
        self.store, self.key, self.store_lost = store, key, store_lost
        self.steps = 0
        self.target: tuple[int, signal.Signals] | None = None  # the step to stop after, and the signal

    @classmethod
    def of_process_group(cls, torchrun_gone: Callable[[], NoReturn]) -> StopAgreement | None:
        """The agreement of the running process group; None where it has no store to agree in. Under torchrun the
        store is its agent's: ``torchrun_gone`` ends the process where it fails (the watch of fastp2phd.torchrun
        would, a moment later)."""
        import torch.distributed as dist

        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:
            return None
        run = (os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        # (A restarted group starts without a stop.)
        return cls(store, "fastp2phd stop/" + "/".join(run), torchrun_gone if agent_store else None)

    def after_step(self, received: signal.Signals | None) -> signal.Signals | None:
        """Called by every process after each step with the signal it received, if any: the signal to stop on
        now, once the step agreed on is done."""
        self.steps += 1
        if self.target is None:
            try:
                if received is not None:  # (the first process's step stands)
                    self.store.compare_set(self.key, "", f"{self.steps + 2} {int(received)}")
                if received is not None or self.store.check([self.key]):
                    step, signum = map(int, self.store.get(self.key).decode().split())
                    self.target = (step, signal.Signals(signum))
            except Exception:
                if self.store_lost is not None:
                    self.store_lost()
                raise
        return self.target[1] if self.target is not None and self.steps >= self.target[0] else None


@contextlib.contextmanager
def stop_between_steps(say, enabled: bool = True, after: str = "this step"):
    """Inside, a first SIGINT or SIGTERM is recorded in the ``StopRequest`` yielded (and said), a SIGINT after it
    raises KeyboardInterrupt. Disabled, or off the main thread (where Python takes no handlers), signals act as they
    did."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # another SIGTERM is the same request (see above)
        request.signal = signal.Signals(signum)
        say(f"{request.signal.name}: stopping after {after}, to save it (Ctrl-C again stops at once, keeping the "
            "last save)")

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class LoaderWorkerSignals:
    """The data loader workers' stop signals; an instance is the loader's ``worker_init_fn``.

    A terminal, a scheduler and torchrun send Ctrl-C and SIGTERM to the whole process group (Slurm to every process
    of the job). A worker they ended would break the batch the run's step waits for, so the workers ignore them:
    the training process stops between steps and ends its workers itself (they also end when it is gone). Once the
    training process leaves its batches (``batches``), a SIGTERM ends a worker again: the loader's shutdown
    terminates a worker that does not return from the dataset (a hung read, say) with one.
    """

    def __init__(self):
        self._ending = multiprocessing.RawValue("b", False)  # (shared with forked and spawned workers)

    def __call__(self, worker_id: int = 0) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (both discard one pending while ``batches`` held it)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _on_sigterm(self, signum, frame) -> None:
        if self._ending.value:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @contextlib.contextmanager
    def batches(self, loader):
        """``iter(loader)``, its workers started with the stop signals held until they ignore them (one sent to the
        whole group as a worker starts reaches this process then)."""
        self._ending.value = False
        if hasattr(signal, "pthread_sigmask"):  # (Windows: no process groups to signal)
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # (a new worker inherits the mask)
            try:
                batches = iter(loader)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        else:
            batches = iter(loader)
        try:
            yield batches
        finally:
            self._ending.value = True
