"""Log handlers (and TensorBoard's writer thread) that survive a full disk (or a closed pipe): one line on
stderr, not a traceback per record.

logging's default handleError prints a traceback for every record that fails to be
written, so a full disk buries the real error under pages of them. These handlers say
once which log cannot be written and why, then drop the records that fail.
"""
from __future__ import annotations

import logging
import sys
import threading


class _ReportOnce:
    _reported = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)  # a bug in a format string: logging's usual report
            return
        if not self._reported:
            self._reported = True
            where = getattr(self, "baseFilename", None) or getattr(self.stream, "name", "a log stream")
            try:
                sys.stderr.write(f"bnonly: warning: cannot write {where} ({error.strerror or error}); its log lines "
                                 "are dropped from now on (free space: the run goes on, checkpoints say if they "
                                 "cannot be written)\n")
                sys.stderr.flush()
            except OSError:
                pass


class SafeFileHandler(_ReportOnce, logging.FileHandler):
    """logging.FileHandler that reports a write failure once."""


class SafeStreamHandler(_ReportOnce, logging.StreamHandler):
    """logging.StreamHandler that reports a write failure once."""


def quiet_writer_threads() -> None:
    """TensorBoard's writer thread re-raises a failed write (a full disk) into threading's hook,
    which prints its traceback; the same error reaches the run at its next write, which ends
    it with the project's one line. So an OSError of that thread is left to the run."""
    if getattr(threading.excepthook, "bnonly_quiet", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        writer_thread = type(args.thread).__module__.startswith("tensorboard.")
        if not (writer_thread and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.bnonly_quiet = True
    threading.excepthook = hook
