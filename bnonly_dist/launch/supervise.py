"""A task's training in a child process, so that the task outlives its training.

Under submitit a task is one Python process. When training dies without running any
Python (NCCL's watchdog aborting with SIGABRT, a segfault, the kernel's OOM killer),
nothing would be left to decide about a restart. So a task (jobs.TrainJob) runs
`bnonly train` as a child and reads how it ended: its exit status (128+N when signal N
killed it) and the failure note the CLI leaves (RUN/logs/failure.rank<r>.json); where
the child could leave none, the task writes it. The stop signals the task receives
(SIGUSR2, SIGTERM) are passed on to the child, which saves and stops like `bnonly
train`; Ctrl-C reaches the child from the terminal itself. The child dies with the task
(PR_SET_PDEATHSIG), so no training outlives a killed task.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bnonly_dist.run import history
from bnonly_dist.run.checkpoint_files import latest, step_of
from bnonly_dist.run.paths import RunPaths

FORWARDED = (signal.SIGUSR2, signal.SIGTERM)
PR_SET_PDEATHSIG = 1


@dataclass
class Ended:
    """How the child ended: its exit status and the stop signals the task passed on meanwhile."""
    code: int  # 0, the CLI's exit code, or 128+N after signal N
    signals: list[int] = field(default_factory=list)

    @property
    def signal_name(self) -> str | None:
        """The signal that killed the child, if one did."""
        if self.code <= 128:
            return None
        with contextlib.suppress(ValueError):
            return signal.Signals(self.code - 128).name
        return None

    @property
    def stopped(self) -> bool:
        """Ended by a stop signal the task received and passed on: a planned stop, not a failure.
        (Exit 0 after saving; or killed by that very signal, when it came before the child's handlers.)"""
        return bool(self.signals) and (self.code == 0 or self.code - 128 in self.signals)


def _dying_with(parent: int):
    def die_with_parent() -> None:
        """In the child before exec: the kernel sends it SIGKILL when the task ends (Linux)."""
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the task ended before prctl: no training without it
            os._exit(1)
    return die_with_parent


def train(config: dict, run_dir: Path) -> Ended:
    """Run `bnonly train` on config (a resolved config's dict) in run_dir as a child; wait for it."""
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame):
        received.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()  # handlers live in the main thread
    with tempfile.NamedTemporaryFile("w", prefix="bnonly-config-", suffix=".yaml") as file:
        yaml.safe_dump(config, file, sort_keys=False)
        file.flush()
        previous = {}
        if main:
            previous = {s: signal.signal(s, forward) for s in FORWARDED}
            # A Python handler, not SIG_IGN: the child starts with the default again (exec resets a handler but
            # keeps an ignored signal ignored) and takes the terminal's Ctrl-C itself.
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            child = subprocess.Popen([sys.executable, "-u", "-m", "bnonly_dist.cli", "train", file.name,
                                      "--run-dir", str(run_dir)], preexec_fn=_dying_with(os.getpid()))
            for signum in received:  # came before the child existed
                child.send_signal(signum)
            code = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return Ended(128 - code if code < 0 else code, received)


def result(run_dir: Path) -> dict:
    """What the child's training returned: the summary of a finished run, else where it stopped."""
    paths = RunPaths(Path(run_dir))
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads(paths.summary.read_text())
        if isinstance(summary, dict):
            return summary
    newest = latest(run_dir)
    return {"run_dir": str(run_dir), "step": step_of(newest) if newest else 0, "finished": False, "stopped": True,
            "checkpoint": str(newest) if newest else None}


def own_note(run_dir: Path, rank: int, since: float, ended: Ended) -> history.Note:
    """The child's failure note; where it left none (killed outright), written here."""
    mine = [n for n in history.failures_since(run_dir, since) if n.rank == rank]
    if mine:
        return mine[-1]
    line = (f"killed by {ended.signal_name}" if ended.signal_name
            else f"ended with exit {ended.code} ({history.meaning(ended.code)}); its error is in the task's log")
    note = history.Note(rank, ended.code, history.kind_of_exit(ended.code), line, None, since)
    history.note_failure(run_dir, rank, note.exit, note.kind, note.line)
    return note

