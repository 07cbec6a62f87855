"""A training run as a submitit job: what Slurm (or the local executor) runs on every task.

Each task exports torch.distributed's variables from submitit's view of the job (rank =
SLURM_PROCID, master = first node, port from the job id) and runs `bnonly train` as a
child process (supervise.py), so that the task is still there to decide when training
dies without running Python (NCCL's watchdog's SIGABRT, a segfault, the OOM killer). On
SIGUSR2 (time limit coming, or preemption) the task passes the signal on, the child saves
on all ranks together and ends, and then the task hands the signal to submitit, whose
handler calls checkpoint() below and requeues the job; the requeued job resumes from the
newest complete checkpoint in the same run directory. On a failure a restart may cure,
the first task to see its child fail decides (restart.after_failure) and, under Slurm,
requeues the job, at most max_failures times per series; without Slurm the
launchers' shared wait resubmits it (submission.wait_here).

Ctrl-C while a launcher waits for a job on this machine (submitit's local executor): the
job is started with SIGINT ignored, so its controller, which would kill the tasks on
Ctrl-C, lets it pass; the tasks' children take Ctrl-C like `bnonly train` (they are in the
terminal's process group): the first stops every rank after the same step with a
checkpoint, a second aborts. A Ctrl-C or SIGTERM sent to the launcher alone reaches the
tasks as SIGTERM through the job's controller (stop_tasks). The launcher says so in one
line (ctrl_c).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from bnonly_dist import config
from bnonly_dist.launch import restart, supervise
from bnonly_dist.run import history
from bnonly_dist.run.finished import reached_end
from bnonly_dist.run.paths import RunPaths

ABORT_WAIT_S = 30  # after a second Ctrl-C: how long the launcher waits for the tasks to end


class TrainingFailed(RuntimeError):
    """A task's training failed: its rank's one-line error (submitit shows it as the job's failure)."""


class TrainJob:
    """Picklable: the resolved config (a dict), the run directory and the restart budget.

    series: what restarts are counted per; None: the Slurm job id (kept across requeues).
    """

    def __init__(self, config: dict, run_dir: str | Path, max_failures: int = restart.DEFAULT_MAX_FAILURES,
                 series: str | None = None):
        self.config, self.run_dir = config, str(run_dir)
        self.max_failures, self.series = max_failures, series

    def __call__(self) -> dict:
        import submitit
        from submitit.slurm.slurm import SlurmJobEnvironment

        from bnonly_dist.rendezvous import master_port  # not dist: this task imports no torch
        if threading.current_thread() is threading.main_thread():
            # Started with SIGINT ignored (spawn_ignoring_ctrl_c): Ctrl-C interrupts the start-up again.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        # Our port rule (see rendezvous.master_port) rather than submitit's, which may pick an ephemeral port.
        env = submitit.JobEnvironment()
        os.environ.setdefault("MASTER_PORT", str(master_port(env.job_id)))
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        run_dir, series, since = Path(self.run_dir), self.series or str(env.job_id), time.time()
        slurm = isinstance(env, SlurmJobEnvironment)
        task = restart.Task(run_dir, series, str(env.job_id), env.global_rank, self.max_failures, slurm)
        if slurm and env.global_rank == 0:
            self._note_requeues_on_sigusr2(task)
        if slurm and not restart.account_for_requeue(run_dir, series, task.job,
                                                     int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                                                     self.max_failures, env.global_rank):
            raise TrainingFailed(f"rank {env.global_rank}: {restart.UNASKED_REQUEUE}; not retried (see "
                                 f"{RunPaths(run_dir).history})")
        attempt = history.read(run_dir).attempt(series)
        if env.global_rank == 0:
            line = restart.announce_restart(run_dir, series, task.job)
            if line:
                print(line, flush=True)  # the job's log (before the run's own logging starts)
        ended = supervise.train(self.config, run_dir)
        if ended.code == 0 or ended.stopped:
            result = supervise.result(run_dir)
            if ended.signals and not reached_end(result, config.from_dict(self.config)):
                handler = signal.getsignal(ended.signals[0])
                if callable(handler):
                    handler(ended.signals[0], None)  # submitit's: on SIGUSR2 checkpoint() and requeue (rank 0)
            return result
        own = supervise.own_note(run_dir, env.global_rank, since, ended)
        if own.kind is history.Kind.INTERRUPTED:
            raise TrainingFailed(f"rank {env.global_rank}: {own.line}")  # the user's Ctrl-C: nothing to decide
        if restart.after_failure(task, attempt, since, own) and slurm:
            os._exit(ended.code)  # no result pickle: the job is not over; Slurm runs it again
        raise TrainingFailed(f"rank {env.global_rank}: {own.line} (exit {ended.code})")

    @staticmethod
    def _note_requeues_on_sigusr2(task: restart.Task) -> None:
        """Wrap submitit's SIGUSR2 handler, which requeues the job on rank 0 (also while this task starts
        or decides, outside supervise.train): every call first leaves the stop row that asks for it."""
        if threading.current_thread() is not threading.main_thread():
            return
        submitits = signal.getsignal(signal.SIGUSR2)
        if not callable(submitits):
            return

        def requeue_with_a_row(signum, frame):
            restart.record_stop(task.run_dir, task.series, task.job, supervise.result(task.run_dir)["step"],
                                "SIGUSR2: time limit or preemption; requeued with the newest checkpoint")
            submitits(signum, frame)

        signal.signal(signal.SIGUSR2, requeue_with_a_row)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on SIGUSR2 after our own save: the same job again, which resumes."""
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.run_dir, self.max_failures, self.series))


@contextlib.contextmanager
def spawn_ignoring_ctrl_c():
    """Start a local job inside: its controller and tasks inherit SIGINT ignored (see the module doc)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(Exception):
    """A second Ctrl-C while waiting for a local job: the tasks abort."""


STOPS = (signal.SIGINT, signal.SIGTERM)  # to the launcher: what Ctrl-C at its terminal, or kill, sends


def hold_stops() -> None:
    """Right after a local job started (its processes already have their own mask): hold Ctrl-C and SIGTERM back
    until ctrl_c's handlers are set, so that one in between is neither lost nor the default's traceback."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)


def stop_tasks(job) -> None:
    """Ask a local job's tasks to stop with a checkpoint: SIGTERM to its controller, which passes it to the tasks,
    which pass it to their training (supervise.FORWARDED). Where the terminal's Ctrl-C reached the training too,
    this copy changes nothing (run/stop.py: one stop flag)."""
    process = getattr(job, "_process", None)  # submitit's LocalJob: the controller it started
    if process is not None and process.poll() is None:
        with contextlib.suppress(OSError):
            process.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def ctrl_c(prog: str, jobs: list):
    """While a launcher waits for local jobs: the first Ctrl-C or SIGTERM (to the launcher's process group, or to
    the launcher alone) stops every task after the same step with a checkpoint, said in one line; a second raises
    Interrupted once the jobs have ended (or ABORT_WAIT_S passed). Yields a list that holds True once one came;
    after that the launcher only reports and ends, so later signals are held back (blocked) from then on: a
    late one must not kill it with the default action while Python shuts down."""
    pressed: list[bool] = []

    def handle(signum, frame):
        if not pressed:
            pressed.append(True)
            print(f"{prog}: {'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name}: every task "
                  "stops after the same step with a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)
            for job in list(jobs):
                stop_tasks(job)
            return
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handle) for s in STOPS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # one held back since the start (hold_stops) comes now
    try:
        yield pressed
    except KeyboardInterrupt:
        for s in STOPS:  # a third Ctrl-C does not cut the wait short with a traceback
            signal.signal(s, signal.SIG_IGN)
        deadline = time.monotonic() + ABORT_WAIT_S  # the tasks got the same Ctrl-C and abort: end after them
        while time.monotonic() < deadline and not all(job.done() for job in jobs):
            time.sleep(0.2)
        raise Interrupted from None
    finally:
        if pressed:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        for s, handler in previous.items():
            signal.signal(s, handler)
