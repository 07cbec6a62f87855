"""Stop signals that reach a training process while it starts, before run.stop's handlers exist.

SIGUSR2 and SIGTERM end a process by default. `bnonly train` may get one in its first
seconds (a preemption; a submitit task passing one on to the training it started, see
launch/supervise.py), long before the loop's StopRequest is in place (imports, process
group, data, model, resume). kept() holds them from the start of the command until a
StopRequest takes them over (take()), so the run still stops with a checkpoint after the
same step on every rank instead of dying on some ranks while others wait for them.
Only the standard library: it must be in place before torch is imported.
"""
from __future__ import annotations

import contextlib
import signal
import threading

KEPT = (signal.SIGUSR2, signal.SIGTERM)
_kept: list[int] = []


@contextlib.contextmanager
def kept():
    """Inside: SIGUSR2 and SIGTERM are kept for the StopRequest to come; the handlers before are back after."""
    previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
        previous = {s: signal.signal(s, _keep) for s in KEPT}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _kept.clear()


def _keep(signum, frame) -> None:
    _kept.append(signum)


def take() -> list[int]:
    """The signals kept so far, oldest first; they are the caller's now."""
    taken = list(_kept)
    _kept.clear()
    return taken
