"""Graceful stop: SIGUSR2 (Slurm's warning before a time limit or preemption) or SIGTERM
only sets a flag; the loop asks every rank at each step, so all ranks stop after the
same step and save one checkpoint together. After the save, a handler that was there
before (submitit's, which requeues the job) gets the signal."""
from __future__ import annotations

import logging
import signal
import threading

from bnonly_dist import dist

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    def __init__(self, every: int = 1):
        self.every = every
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: stopping after this step with a checkpoint", self.signal_name)

    def agreed(self, step: int) -> bool:
        """True on every rank once any rank has received a stop signal (collective every `every` steps)."""
        return step % self.every == 0 and dist.any_rank(self.signal_name is not None)

    def hand_over(self) -> None:
        """Pass the received signal to the Python handler that was installed before ours, if any."""
        if self.signal_name is None:
            return
        signum = signal.Signals[self.signal_name]
        previous = self._previous.get(signum)
        self.close()
        if callable(previous):
            previous(signum, None)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
