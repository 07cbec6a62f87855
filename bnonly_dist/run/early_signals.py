"""Stop signals that reach a training process while it starts, before run.stop's handlers exist.

SIGUSR2 and SIGTERM end a process by default. `bnonly train` may get one in its first
seconds (a preemption; a submitit task passing one on to the training it started, see
launch/supervise.py), long before the loop's StopRequest is in place (imports, process
group, data, model, resume). kept() holds them from the start of the command until a
StopRequest takes them over (take()), so the run still stops with a checkpoint after the
same step on every rank instead of dying on some ranks while others wait for them. The
same signal again a second later, or any after the loop has ended, ends the process as
the default would. A Ctrl-C while the command starts (and after the loop, outside the
StopRequest's own handling of it) ends the process at once (end_on_ctrl_c): raised as
KeyboardInterrupt inside an import, it could be swallowed by a library's bare except or
leave a module half imported for the next import to trip over.
Only the standard library: it must be in place before torch is imported.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

KEPT = (signal.SIGUSR2, signal.SIGTERM)
REPEAT_S = 1.0  # the same signal again after this long ends the process (a start-up that hangs)
_kept: list[tuple[int, float]] = []
_taken = False


@contextlib.contextmanager
def kept():
    """Inside: SIGUSR2 and SIGTERM are kept for the StopRequest to come; the handlers before are back after."""
    global _taken
    _taken = False
    previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
        previous = {s: signal.signal(s, _keep) for s in KEPT}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _kept.clear()
        _taken = False


def _keep(signum, frame) -> None:
    """Kept for the loop; after the loop took over (its handlers are gone again: the run is finishing), or
    when the same signal comes again later than REPEAT_S, the signal's default: the process ends."""
    now = time.monotonic()
    if _taken or any(kept == signum and now - at > REPEAT_S for kept, at in _kept):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _kept.append((signum, now))


def take() -> list[int]:
    """The signals kept so far, oldest first; they are the caller's (a StopRequest's) now."""
    global _taken
    taken = [signum for signum, _ in _kept]
    _kept.clear()
    _taken = True
    return taken


def end_on_ctrl_c(say: Callable[[], int] | None = None) -> bool:
    """From now on a Ctrl-C ends the process at once with the exit code say() returns after saying it in one
    line (without say: "bnonly: interrupted", 130), where no other handler than Python's default is in place
    (a launcher that imports the CLI keeps its own); True if taken. signal.default_int_handler gives it back."""
    def end(signum, frame):
        if say is None:
            print("bnonly: interrupted", file=sys.stderr, flush=True)
        code = say() if say is not None else 130
        sys.stdout.flush()
        os._exit(code)

    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, end)
            return True
    except ValueError:  # not the main thread
        pass
    return False
