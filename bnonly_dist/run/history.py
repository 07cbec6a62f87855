"""A run's failure, restart and stop history: RUN/history.jsonl, one JSON object per decision.

    {"time": "...", "series": "4242", "job": "4242", "attempt": 1, "event": "failure", "step": 11,
     "exit": 1, "cause": "rank 0 lost contact ...", "decision": "retry", "why": "restart 1 of at most 3"}
    {"time": "...", "series": "4242", "job": "4242", "attempt": 2, "event": "restart", "step": 8,
     "checkpoint": "RUN/checkpoints/step_00000008", "steps_lost": 3}
    {"time": "...", "series": "4242", "job": "4242", "event": "stop", "step": 20,
     "why": "SIGUSR2: stopped with a checkpoint", "requeue": true, "slurm_run": 1}

A series is one submission (a Slurm job id, kept across requeues); its restarts are
counted against --max-failures. Under Slurm each row says which run of the job wrote it
(slurm_run: SLURM_RESTART_COUNT), and a row that asks Slurm for the next run says
requeue: true, so that a requeue nobody asked for (a node failure) shows. Every failing
process also leaves a note, RUN/logs/failure.rank<r>.json (its exit code, one-line error
and the step it had reached), from which the one decider of an attempt picks the cause. Only the standard library: the sbatch
scripts' `bnonly retry` must answer quickly.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from bnonly_dist.run.checkpoint_files import latest, step_of
from bnonly_dist.run.paths import RunPaths


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rows(run_dir: Path) -> list[dict]:
    """Every row of the history (a torn last line, from a kill mid-write, is skipped)."""
    path = RunPaths(Path(run_dir)).history
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                out.append(row)
    return out


def append(run_dir: Path, row: dict) -> dict:
    """Add one row (time filled in) and return it; the caller holds locked() if others may write."""
    row = {"time": now_iso(), **row}
    if "SLURM_JOB_ID" in os.environ:  # which run of a requeued Slurm job wrote it (restart.account_for_requeue)
        row.setdefault("slurm_run", int(os.environ.get("SLURM_RESTART_COUNT") or 0))
    path = RunPaths(Path(run_dir)).history
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return row


@contextlib.contextmanager
def locked(run_dir: Path):
    """One decider at a time across the tasks of a job (an flock on RUN/.history.lock)."""
    path = RunPaths(Path(run_dir)).root / ".history.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def step_reached(run_dir: Path, notes: list[dict] = ()) -> int:
    """The step a failed attempt reached: the furthest its failing ranks' notes name; without such notes,
    the last step the run logged (metrics.jsonl, every train.log_every steps) or saved."""
    noted = [n["step"] for n in notes if isinstance(n.get("step"), int)]
    if noted:
        return max(noted)
    paths = RunPaths(Path(run_dir))
    newest = latest(run_dir)
    step = step_of(newest) if newest else 0
    if paths.metrics.is_file():
        with open(paths.metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))  # the tail holds the last rows
            for line in f.read().splitlines()[::-1]:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        step = max(step, row["step"])
                        break
    return step


def note_failure(run_dir: Path, rank: int, code: int, line: str, step: int | None = None) -> None:
    """This process's failure and the step its loop had reached (if known), for the attempt's decider
    (best effort: the disk may be full)."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():  # nothing is created for a run that never started
        return
    path = paths.logs / f"failure.rank{rank}.json"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        note = {"unix_time": time.time(), "rank": rank, "exit": code, "line": line}
        path.write_text(json.dumps({**note, **({"step": step} if isinstance(step, int) else {})}) + "\n")


def failures_since(run_dir: Path, since: float) -> list[dict]:
    """The failure notes written at or after since (seconds since the epoch), lowest rank first."""
    notes = []
    for path in RunPaths(Path(run_dir)).logs.glob("failure.rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            note = json.loads(path.read_text())
            if isinstance(note, dict) and note.get("unix_time", 0) >= since:
                notes.append(note)
    return sorted(notes, key=lambda n: n.get("rank", 0))


def note_stop(run_dir: Path, step: int, signal_name: str | None) -> None:
    """The run stopped on a signal with a checkpoint of step (best effort, like note_failure)."""
    with contextlib.suppress(OSError):
        RunPaths(Path(run_dir)).stopped.write_text(json.dumps({"unix_time": time.time(), "step": step,
                                                               "signal": signal_name}) + "\n")


def take_stop(run_dir: Path) -> dict | None:
    """The last stop noted and not yet taken; taken now (the next stop writes a new one)."""
    path = RunPaths(Path(run_dir)).stopped
    with contextlib.suppress(OSError, ValueError):
        note = json.loads(path.read_text())
        path.unlink()
        return note if isinstance(note, dict) else None
    return None
