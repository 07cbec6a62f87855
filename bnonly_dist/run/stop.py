"""Graceful stop: SIGUSR2 (Slurm's warning before a time limit or preemption), SIGTERM or a
first Ctrl-C (SIGINT) only sets a flag; the loop calls agreed(step) after every step and
every `every` steps (train.stop_check_every) the ranks agree on it, so all ranks stop
after the same step and save one checkpoint together. A second Ctrl-C (a second or more later) aborts at once
(KeyboardInterrupt: exit 130; the run resumes from its last checkpoint). A signal that
arrives twice within DUPLICATE_S (Slurm's, and the copy a submitit task passes on to its
training) counts once. What comes after the stop (submitit's requeue) is the task's job:
launch/jobs.py."""
from __future__ import annotations

import logging
import signal
import threading
import time

from bnonly_dist import dist
from bnonly_dist.run import early_signals

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
DUPLICATE_S = 1.0


class StopRequest:
    def __init__(self, every: int = 1):
        if every < 1:
            raise ValueError(f"stop check interval must be at least 1 step, got {every}")
        self.every = every
        self.signal_name: str | None = None
        self._first_sigint: float | None = None
        self._last: dict[int, float] = {}
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
            for signum in early_signals.take():  # came while the process started (bnonly train)
                self._handle(signum, None)

    def _handle(self, signum, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        last = self._last.get(signum)
        if signum != signal.SIGINT and last is not None and now - last < DUPLICATE_S:
            return  # the same signal twice at once: Slurm's and the copy the submitit task passed on
        self._last[signum] = now
        if signum == signal.SIGINT and self._first_sigint is not None:
            # torchrun forwards the terminal's Ctrl-C to its workers, who also get it from the
            # terminal: a copy within a second is the same keypress.
            if now - self._first_sigint > DUPLICATE_S:
                raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
            return
        if signum == signal.SIGINT:
            self._first_sigint = now
        self.signal_name = self.signal_name or name
        hint = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
        log.warning("received %s: stopping within %d steps with a checkpoint%s", name, self.every, hint)

    def agreed(self, step: int) -> bool:
        """True on every rank once any rank has received a stop signal; asks the others only
        on multiples of `every` (a host-side all-reduce there: collective on those steps)."""
        if step % self.every:
            return False
        return dist.any_rank(self.signal_name is not None)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
