"""Bounded automatic restart: one pure decision over the ledger, and the three places that ask it.

    decide(ledger, outcome) -> Decision      no file, no process: the rules below, in order
      1. a never-retried kind (config, diverged, damaged data, Ctrl-C)   -> stop
      2. the same error at the same step as the failure before          -> stop (it would fail again;
         not for a node lost: two node failures say nothing about a third)
      3. --max-failures 0                                               -> stop
      4. the series' --max-failures restarts used                       -> stop
      5. otherwise                                                      -> retry from the newest checkpoint

Who asks (each records the answer as one Failure row of RUN/history.jsonl, history.py, and
says it in one line): under submitit, the first task whose training failed (after_failure;
a task that only lost its peers waits LOST_CONTACT_WAIT_S, so that the task with the real
cause speaks first), which then requeues the Slurm job; the sbatch scripts' `bnonly retry`
after srun returned (retry_command); and, at the start of a Slurm run nobody asked for (a
node failed), the first task or script to start (account_for_requeue). The cause of an
attempt is picked from the failing processes' notes (pick_cause). Only the standard library.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bnonly_dist.run import history
from bnonly_dist.run.checkpoint_files import latest, latest_good, step_of
from bnonly_dist.run.history import NEVER_RETRIED_KINDS, Failure, Kind, Ledger, Note, Restart, Stop
from bnonly_dist.run.paths import RunPaths

DEFAULT_MAX_FAILURES = 3
LOST_CONTACT_WAIT_S = 5.0
UNASKED_REQUEUE = ("requeued by Slurm, not by a task of the job: a node failed or was rebooted, or someone ran "
                   "scontrol requeue; no task was left to say more")


@dataclass(frozen=True)
class Outcome:
    """How an attempt of a series ended, and the budget the series was submitted with."""
    series: str
    step: int  # the step it reached (history.step_reached)
    kind: Kind
    cause: str  # "rank R: <its one-line error>", or what the exit status alone says
    exit: int | None  # None: no task was left to tell it (a node lost)
    max_failures: int = DEFAULT_MAX_FAILURES


@dataclass(frozen=True)
class Decision:
    retry: bool
    why: str
    attempt: int  # the attempt that failed


def _same(a: str, b: str) -> bool:
    """The same error, whatever ports, pids or addresses it names."""
    return re.sub(r"\d+", "#", a) == re.sub(r"\d+", "#", b)


def decide(ledger: Ledger, outcome: Outcome) -> Decision:
    """Retry the failed attempt or not (the rules of the module's docstring)."""
    attempt = ledger.attempt(outcome.series)
    used = sum(1 for r in ledger.of(outcome.series) if isinstance(r, Failure) and r.retry)
    previous = ledger.failures[-1] if ledger.failures else None
    budget = outcome.max_failures
    if outcome.kind in NEVER_RETRIED_KINDS:
        code, reason = NEVER_RETRIED_KINDS[outcome.kind]
        return Decision(False, f"never retried: {reason} (exit {code})", attempt)
    if (previous and previous.step == outcome.step and _same(previous.cause, outcome.cause)
            and outcome.kind is not Kind.NODE_LOST):
        return Decision(False, f"it failed at step {outcome.step} with the same error as attempt {previous.attempt}: "
                        "a restart would fail the same way", attempt)
    if budget <= 0:
        return Decision(False, "retrying is off (--max-failures 0)", attempt)
    if used >= budget:
        return Decision(False, f"all {budget} restarts of --max-failures {budget} are used", attempt)
    return Decision(True, f"restart {used + 1} of at most {budget}", attempt)


def pick_cause(notes: list[Note], code: int) -> tuple[int, Kind, str]:
    """(exit, kind, line) of an attempt from its failure notes: a never-retried kind first, then a task's own
    error, then a task killed by a signal, then a lost peer; without such notes, the exit code alone."""
    def order(note: Note):
        return (note.kind not in NEVER_RETRIED_KINDS, note.kind in (Kind.LOST_PEER, Kind.TIMEOUT),
                note.kind is Kind.SIGNAL, note.rank)
    alone = history.kind_of_exit(code)
    if notes:
        note = min(notes, key=order)
        if note.kind in NEVER_RETRIED_KINDS or alone not in NEVER_RETRIED_KINDS:
            return note.exit, note.kind, f"rank {note.rank}: {note.line}"
    return code, alone, f"the job step ended with exit {code} ({history.meaning(code)})"


def record(run_dir: Path, outcome: Outcome, job: str, requeue: bool = False) -> Failure:
    """Decide and write the Failure row (the caller holds history.locked); requeue: a retry is a Slurm requeue."""
    decision = decide(history.read(run_dir), outcome)
    return history.append(run_dir, Failure(
        outcome.series, job, decision.attempt, outcome.step, outcome.exit, outcome.kind, outcome.cause,
        decision.retry, decision.why, requeue=decision.retry and requeue))


def from_notes(run_dir: Path, series: str, code: int, since: float, max_failures: int) -> Outcome:
    """The outcome of an attempt that ended with code, from the failure notes written since it began."""
    notes = history.failures_since(run_dir, since)
    code, kind, cause = pick_cause(notes, code)
    return Outcome(series, history.step_reached(run_dir, notes), kind, cause, code, max_failures)


def decision_line(row: Failure, run_dir: Path) -> str:
    head = f"bnonly: attempt {row.attempt} failed at step {row.step} ({row.cause})"
    if row.retry:
        return f"{head}; retrying from the newest complete checkpoint ({row.why})"
    return f"{head}; not retried: {row.why}; see {RunPaths(Path(run_dir)).history}"


@dataclass(frozen=True)
class Task:
    """A task of a job that supervises its rank's training (jobs.TrainJob)."""
    run_dir: Path
    series: str
    job: str
    rank: int
    max_failures: int
    slurm: bool  # a retry is a Slurm requeue


def after_failure(task: Task, attempt: int, since: float, own: Note) -> bool:
    """The task's training failed (own: its note): the first task to get here decides for the attempt and
    says so; True: restart (a Slurm requeue is then this task's to make when it decided, see decided_here)."""
    if own.kind in (Kind.LOST_PEER, Kind.TIMEOUT):
        time.sleep(LOST_CONTACT_WAIT_S)  # the rank that failed first writes its note meanwhile
    with history.locked(task.run_dir):
        made = [r for r in history.read(task.run_dir).of(task.series) if isinstance(r, Failure) and r.attempt == attempt]
        if made:
            return made[-1].retry  # another task decided for this attempt
        outcome = from_notes(task.run_dir, task.series, own.exit, since, task.max_failures)
        row = record(task.run_dir, outcome, task.job, requeue=task.slurm)
    say(decision_line(row, task.run_dir), task.run_dir, task.rank)
    if row.retry and task.slurm:
        requeue(task.job)  # Slurm ends every task of the job and runs it again
    return row.retry


def record_stop(run_dir: Path, series: str, job: str, step: int, why: str) -> None:
    """A planned stop (time limit, preemption, scancel) with a checkpoint at step, that asks for a requeue."""
    history.append(run_dir, Stop(series, job, step, why, requeue=True))


def account_for_requeue(run_dir: Path, series: str, job: str, restart_count: int, max_failures: int,
                        rank: int) -> bool:
    """At the start of run restart_count of a Slurm job (SLURM_RESTART_COUNT): if no row of the run before
    asked for the requeue, Slurm requeued it on its own. After a stop with a checkpoint in the run before and
    nothing logged since (a preemption) that is recorded as a stop; otherwise the run ended without a word (a
    node failed) and is recorded and decided as a failure. Every task gets the same answer; False: stop here."""
    if not Path(run_dir).is_dir():
        return True  # nothing was created yet: nothing to account for (and nothing is created here)
    with history.locked(run_dir):
        stopped_at = history.take_stop(run_dir)  # each start takes it: it explains only the requeue right after it
        if restart_count <= 0:
            return True
        mine = history.read(run_dir).of(series)
        recorded = [r for r in mine if r.slurm_run == restart_count and getattr(r, "unasked", False)]
        if recorded:
            return not (isinstance(recorded[0], Failure) and not recorded[0].retry)  # another task recorded it
        if any(r.slurm_run == restart_count - 1 and getattr(r, "requeue", False) for r in mine):
            return True
        newest = latest(run_dir)
        if (stopped_at is not None and newest is not None and stopped_at == step_of(newest)
                and history.step_reached(run_dir) <= stopped_at):
            history.append(run_dir, Stop(series, job, stopped_at, "requeued by Slurm after a stop with a checkpoint "
                                         "(a preemption)", unasked=True))
            return True
        row = record(run_dir, Outcome(series, history.step_reached(run_dir), Kind.NODE_LOST, UNASKED_REQUEUE, None,
                                      max_failures), job)
    say(decision_line(row, run_dir), run_dir, rank)
    return row.retry


def announce_restart(run_dir: Path, series: str, job: str) -> str | None:
    """At the start of an attempt that follows a retry decision: record which checkpoint it resumes from and
    how many steps were lost; the line to log (None when no retry is pending)."""
    failed = history.read(run_dir).retry_pending(series)
    if failed is None:
        return None
    checkpoint = latest_good(run_dir)
    start = step_of(checkpoint) if checkpoint else 0
    lost = max(0, failed.step - start)
    history.append(run_dir, Restart(series, job, failed.attempt + 1, start, str(checkpoint) if checkpoint else None,
                                    lost))
    where = f"checkpoint {checkpoint} (step {start})" if checkpoint else "scratch (no complete checkpoint)"
    return (f"bnonly: {failed.why} after attempt {failed.attempt} failed at step {failed.step}: "
            f"resuming from {where}; {lost} step{'' if lost == 1 else 's'} lost")


def restart_pending(run_dir: Path, series: str) -> bool:
    """The series' last row is a decision to retry that no attempt has taken up yet."""
    return history.read(run_dir).retry_pending(series) is not None


def refusal_line(run_dir: Path, series: str) -> str | None:
    """The decision not to retry the series' last attempt, as a line for the launcher's console; None if
    the last row is no such decision (the attempt ended before anything decided)."""
    mine = history.read(run_dir).of(series)
    if mine and isinstance(mine[-1], Failure) and not mine[-1].retry:
        return decision_line(mine[-1], run_dir)
    return None


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


def command(run_dir: Path, code: int | None, requeued: int | None, stopped: bool, series: str, since: float,
            max_failures: int) -> int:
    """`bnonly retry`: the sbatch scripts' questions (one of code, requeued, stopped). Exit 0: go on (run the
    training again, or start it); 1: stop. ConfigError on bad numbers or a run directory that does not exist."""
    from bnonly_dist.config import ConfigError
    if max_failures < 0:
        raise ConfigError(f"--max-failures {max_failures}: must be 0 (no retries) or more")
    if requeued is not None and requeued < 0:
        raise ConfigError(f"--requeued {requeued}: must be 0 or more ($SLURM_RESTART_COUNT)")
    if code is not None and not 0 <= code <= 255:
        raise ConfigError(f"--exit-code {code}: must be an exit status, 0 to 255")
    if since < 0:
        raise ConfigError(f"--since {since:g}: must be a time in seconds since the epoch, 0 or more")
    if requeued is None and not Path(run_dir).is_dir():  # a first start may come before the run dir exists
        raise ConfigError(f"{run_dir} is not a run directory (it does not exist); name the run's directory")
    if code == 0:
        print("bnonly: exit 0 is a success, not a failure: nothing to retry", flush=True)
        return 1
    if stopped:
        newest = latest(run_dir)
        record_stop(run_dir, series, series, step_of(newest) if newest else 0,
                    "stopped with a checkpoint (time limit or preemption); the script requeues the job")
        return 0
    if requeued is not None:  # the start of a Slurm run: account for a requeue nobody asked for
        if not account_for_requeue(run_dir, series, series, requeued, max_failures, 0):
            return 1
    else:  # srun returned code: decide
        with history.locked(run_dir):
            row = record(run_dir, from_notes(run_dir, series, code, since, max_failures), series)
        print(decision_line(row, run_dir), flush=True)
        if not row.retry:
            return 1
    line = announce_restart(run_dir, series, series)
    if line:
        print(line, flush=True)
    return 0
