"""Bounded automatic restart after a failure: the exit codes, the decision, the requeue.

A failure a restart can cure (a peer lost, a collective timed out, a process killed by a
signal, a CUDA/NCCL error, an I/O error) is retried from the newest complete checkpoint,
at most --max-failures times per submission (a series: one Slurm job id, kept across
requeues). Never retried: the exit codes in NEVER_RETRIED, and a failure at the same step
with the same error as the attempt before (it would fail again). Each decision is one
line in the job's log and one row of RUN/history.jsonl (history.py).

Who decides: under submitit, the first task whose training (its child, supervise.py)
failed (a task whose training only lost its peers waits LOST_CONTACT_WAIT_S, so the task
with the real cause speaks first), which then requeues the Slurm job; the sbatch scripts
ask `bnonly retry` after srun returns. A run of a Slurm job that ended without a word (a
node failed) is decided when Slurm's requeue starts the next one (account_for_requeue).
Only the standard library at import (the CLI's exit codes come from here).
"""
from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bnonly_dist.run import history
from bnonly_dist.run.paths import RunPaths

EXIT_RETRYABLE = 1  # anything a restart may cure
EXIT_CONFIG = 2  # config, command line, run directory, data set
EXIT_DIVERGED = 3  # the training loss became NaN or inf
EXIT_DAMAGED_DATA = 4  # a file of the data set is corrupt
EXIT_INTERRUPTED = 130  # a second Ctrl-C
NEVER_RETRIED = {
    EXIT_CONFIG: "a config, command-line, run-directory or data-set error",
    EXIT_DIVERGED: "the loss diverged",
    EXIT_DAMAGED_DATA: "a damaged data file",
    EXIT_INTERRUPTED: "interrupted by Ctrl-C",
}
DEFAULT_MAX_FAILURES = 3
LOST_CONTACT_WAIT_S = 5.0


def exit_code(err: BaseException) -> int:
    """The exit code a run ending with err gets (the CLI's and the restart rules' one mapping)."""
    from bnonly_dist.config import ConfigError
    from bnonly_dist.data.layout import DamagedData, DataError
    from bnonly_dist.run.checkpoint import CheckpointIncompatible
    from bnonly_dist.run.rundir import RunDirError
    from bnonly_dist.run.train import Diverged
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, DamagedData):
        return EXIT_DAMAGED_DATA
    if isinstance(err, (ConfigError, DataError, RunDirError, CheckpointIncompatible)):
        return EXIT_CONFIG
    if isinstance(err, Diverged):
        return EXIT_DIVERGED
    return EXIT_RETRYABLE


def meaning(code: int) -> str:
    """What an exit code (or srun's 128+N, or a negative signal number) says."""
    if code in NEVER_RETRIED:
        return NEVER_RETRIED[code]
    number = -code if code < 0 else code - 128 if code > 128 else None
    if number is not None:
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            pass
    return "a failure a restart may cure"


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _same(a: str, b: str) -> bool:
    """The same error, whatever ports, pids or addresses it names."""
    return re.sub(r"\d+", "#", a) == re.sub(r"\d+", "#", b)


def _series_rows(run_dir: Path, series: str) -> list[dict]:
    return [r for r in history.rows(run_dir) if r.get("series") == series]


def _failures(run_dir: Path, series: str | None = None) -> list[dict]:
    return [r for r in history.rows(run_dir) if r.get("event") == "failure"
            and (series is None or r.get("series") == series)]


def attempt_number(run_dir: Path, series: str) -> int:
    """The attempt that starts now in series (1 for a fresh submission)."""
    return len(_failures(run_dir, series)) + 1


def pick_cause(notes: list[dict], code: int) -> tuple[int, str]:
    """The attempt's cause from its failure notes: a never-retried code first, then a task's own
    error, then a task killed by a signal, then a lost peer; without such notes, the job step's exit
    code alone."""
    def order(note):
        line = note.get("line", "")
        return (note.get("exit") not in NEVER_RETRIED, line.startswith("lost contact"), line.startswith("killed by"),
                note.get("rank", 0))
    said = f"the job step ended with exit {code} ({meaning(code)})"
    if notes:
        note = min(notes, key=order)
        if note.get("exit") in NEVER_RETRIED or code not in NEVER_RETRIED:
            return int(note.get("exit", code)), f"rank {note.get('rank', 0)}: {note.get('line', '')}"
    return code, said


def decide(run_dir: Path, series: str, job: str, attempt: int, code: int | None, cause: str, max_failures: int,
           requeue: bool = False, notes: list[dict] = ()) -> dict:
    """Record and return the decision about a failed attempt (the caller holds history.locked); requeue:
    a retry is a Slurm requeue (rows say so, and say a requeue by Slurm alone, for account_for_requeue)."""
    step = history.step_reached(run_dir, notes)
    earlier = _failures(run_dir)
    used = sum(r.get("decision") == "retry" for r in earlier if r.get("series") == series)
    previous = earlier[-1] if earlier else None
    retry = False
    if code in NEVER_RETRIED:
        why = f"never retried: {NEVER_RETRIED[code]} (exit {code})"
    elif (previous and previous.get("step") == step and _same(previous.get("cause", ""), cause)
          and cause != UNASKED_REQUEUE):  # two node failures in a row say nothing about the next attempt
        why = (f"it failed at step {step} with the same error as attempt {previous.get('attempt')}: a restart "
               "would fail the same way")
    elif max_failures <= 0:
        why = "retrying is off (--max-failures 0)"
    elif used >= max_failures:
        why = f"all {max_failures} restarts of --max-failures {max_failures} are used"
    else:
        retry, why = True, f"restart {used + 1} of at most {max_failures}"
    return history.append(run_dir, {"series": series, "job": job, "attempt": attempt, "event": "failure",
                                    "step": step, "exit": code, "cause": cause,
                                    "decision": "retry" if retry else "stop", "why": why,
                                    **({"requeue": True} if retry and requeue else {}),
                                    **({"unasked": True} if cause == UNASKED_REQUEUE else {})})


def decision_line(row: dict, run_dir: Path) -> str:
    head = f"bnonly: attempt {row['attempt']} failed at step {row['step']} ({row['cause']})"
    if row["decision"] == "retry":
        return f"{head}; retrying from the newest complete checkpoint ({row['why']})"
    return f"{head}; not retried: {row['why']}; see {RunPaths(Path(run_dir)).history}"


UNASKED_REQUEUE = ("requeued by Slurm, not by a task of the job: a node failed or was rebooted, or someone ran "
                   "scontrol requeue; no task was left to say more")


def note_stop(run_dir: Path, series: str, job: str, step: int, why: str) -> None:
    """A planned stop (time limit, preemption, scancel) with a checkpoint at step: what the Slurm requeue
    after it is for."""
    history.append(run_dir, {"series": series, "job": job, "event": "stop", "step": step, "why": why,
                             "requeue": True})


def account_for_requeue(run_dir: Path, series: str, job: str, restart_count: int, max_failures: int,
                        rank: int) -> bool:
    """At the start of run restart_count of a Slurm job (SLURM_RESTART_COUNT): if no row of the run before
    asked for the requeue (a stop, a retry by requeue; history rows carry their slurm_run), Slurm requeued
    it on its own. After a stop with a checkpoint in the run before and nothing logged since (a
    preemption: SIGTERM, then Slurm's requeue) that is recorded as a stop; otherwise the run ended
    without a word (UNASKED_REQUEUE: a node failed) and is recorded and decided as a failure. Every
    task gets the same answer; False: stop here."""
    if restart_count <= 0 and not Path(run_dir).is_dir():
        return True  # a first start: nothing to account for, and nothing is created before the run checks it
    with history.locked(run_dir):
        stop = history.take_stop(run_dir)  # each start takes it: it can only explain the requeue right after it
        if restart_count <= 0:
            return True
        mine = _series_rows(run_dir, series)
        recorded = [r for r in mine if r.get("slurm_run") == restart_count and r.get("unasked")]
        if recorded:
            return recorded[0].get("decision") != "stop"  # another task of this run recorded it
        if any(r.get("slurm_run") == restart_count - 1 and r.get("requeue") for r in mine):
            return True
        stop_step = _stopped_with_checkpoint(run_dir, stop)
        if stop_step is not None:
            history.append(run_dir, {"series": series, "job": job, "event": "stop", "step": stop_step,
                                     "why": "requeued by Slurm after a stop with a checkpoint (a preemption)",
                                     "unasked": True})
            return True
        row = decide(run_dir, series, job, attempt_number(run_dir, series), None, UNASKED_REQUEUE, max_failures)
    say(decision_line(row, run_dir), run_dir, rank)
    return row["decision"] == "retry"


def _stopped_with_checkpoint(run_dir: Path, stop: dict | None) -> int | None:
    """The step of the newest complete checkpoint if the run before stopped there on a signal (stop: its
    note, RUN/logs/stopped.json) and logged nothing after it; else None."""
    from bnonly_dist.run.checkpoint_files import latest, step_of
    newest = latest(run_dir)
    if stop is None or newest is None or stop.get("step") != step_of(newest):
        return None
    return stop["step"] if history.step_reached(run_dir) <= stop["step"] else None


def announce_restart(run_dir: Path, series: str, job: str) -> str | None:
    """At the start of an attempt that follows a retry decision: record which checkpoint it
    resumes from and how many steps were lost; the line to log (None on a first attempt)."""
    mine = _series_rows(run_dir, series)
    if not _retry_pending(mine):
        return None
    failed = mine[-1]
    from bnonly_dist.run.checkpoint_files import latest_good, step_of
    checkpoint = latest_good(run_dir)
    start = step_of(checkpoint) if checkpoint else 0
    lost = max(0, failed["step"] - start)
    history.append(run_dir, {"series": series, "job": job, "attempt": failed["attempt"] + 1, "event": "restart",
                             "step": start, "checkpoint": str(checkpoint) if checkpoint else None, "steps_lost": lost})
    where = f"checkpoint {checkpoint} (step {start})" if checkpoint else "scratch (no complete checkpoint)"
    return (f"bnonly: {failed['why']} after attempt {failed['attempt']} failed at step {failed['step']}: "
            f"resuming from {where}; {lost} step{'' if lost == 1 else 's'} lost")


def restart_pending(run_dir: Path, series: str) -> bool:
    """The series' last row is a decision to retry that no attempt has taken up yet."""
    return _retry_pending(_series_rows(run_dir, series))


def refusal_line(run_dir: Path, series: str) -> str | None:
    """The decision not to retry the series' last attempt, as a line for the launcher's console; None if
    the last row is no such decision (the attempt ended before anything decided)."""
    rows = _series_rows(run_dir, series)
    if rows and rows[-1].get("event") == "failure" and rows[-1].get("decision") == "stop":
        return decision_line(rows[-1], run_dir)
    return None


def _retry_pending(rows: list[dict]) -> bool:
    return bool(rows) and rows[-1].get("event") == "failure" and rows[-1].get("decision") == "retry"


def after_failure(run_dir: Path, code: int, line: str, series: str, job: str, attempt: int, rank: int,
                  since: float, max_failures: int, requeue: bool) -> tuple[bool, bool]:
    """A task's training ended with exit code and its note's line: the first task to get here decides
    for the attempt and logs the decision. (restart?, decided here?): the decider requeues (requeue:
    under Slurm)."""
    if line.startswith("lost contact"):
        time.sleep(LOST_CONTACT_WAIT_S)  # the rank that failed first writes its note meanwhile
    with history.locked(run_dir):
        made = [r for r in _failures(run_dir, series) if r.get("attempt") == attempt]
        if made:
            return made[-1]["decision"] == "retry", False  # another task decided for this attempt
        row = _decide_from_notes(run_dir, series, job, attempt, code, since, max_failures, requeue)
    say(decision_line(row, run_dir), run_dir, rank)
    return row["decision"] == "retry", True


def _decide_from_notes(run_dir: Path, series: str, job: str, attempt: int, code: int, since: float,
                       max_failures: int, requeue: bool = False) -> dict:
    """The decision about an attempt that ended with code, from the failure notes written since it began."""
    notes = history.failures_since(run_dir, since)
    code, cause = pick_cause(notes, code)
    return decide(run_dir, series, job, attempt, code, cause, max_failures, requeue, notes=notes)


def say(line: str, run_dir: Path, rank: int) -> None:
    """One line in the job's log (the deciding task's stderr) and in RUN/logs/rank0.log, the run's main
    log, whichever rank decided (no training of this task is writing to it now)."""
    print(line, file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        with open(RunPaths(Path(run_dir)).rank_log(0), "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} [rank{rank}] WARNING {line.removeprefix('bnonly: ')}\n")


def requeue(job_id: str) -> None:
    """Put the Slurm job back in the queue; Slurm ends its tasks and runs it again (same job id)."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


def retry_command(run_dir: Path, code: int, series: str, since: float, max_failures: int) -> bool:
    """`bnonly retry`: the sbatch scripts' decision after srun returned code; True to run again."""
    with history.locked(run_dir):
        row = _decide_from_notes(run_dir, series, series, attempt_number(run_dir, series), code, since, max_failures)
    print(decision_line(row, run_dir), flush=True)
    if row["decision"] != "retry":
        return False
    print(announce_restart(run_dir, series, series), flush=True)
    return True


def start_command(run_dir: Path, series: str, restart_count: int, max_failures: int) -> bool:
    """`bnonly retry --requeued N`: the sbatch scripts' start; True to go on."""
    if not account_for_requeue(run_dir, series, series, restart_count, max_failures, 0):
        return False
    if restart_pending(run_dir, series):
        print(announce_restart(run_dir, series, series), flush=True)
    return True


def stop_command(run_dir: Path, series: str) -> None:
    """`bnonly retry --stopped`: the sbatch scripts record a planned stop before they requeue the job."""
    from bnonly_dist.run.checkpoint_files import latest, step_of
    newest = latest(run_dir)
    note_stop(run_dir, series, series, step_of(newest) if newest else 0,
              "stopped with a checkpoint (time limit or preemption); the script requeues the job")
