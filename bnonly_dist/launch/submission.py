"""One launch from the checks to the result: what launchers/submit.py (one run) and launchers/sweep.py (many) do.

Every check that can run does before anything is created (config, data, run directories, the request
against the cluster, the cost of a CPU fallback), so that one try names every refusal. Then the run
directories are prepared and the jobs submitted (one job, or one job array under Slurm), each run's job id
is recorded, and the launcher waits: under Slurm only with --wait; without Slurm always, on this machine
(wait_here), at most `parallel` runs at once. A single run is a sweep of one point with parallel 1: the
same loop, only its lines are worded for one job. A failure a restart may cure is submitted again there, as
a Slurm requeue would (launch/restart.py decides). A launcher's lines start with its name (PROG: submit or
sweep); a sweep point's lines with its label.
"""
from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bnonly_dist import config
from bnonly_dist.data.layout import DataError
from bnonly_dist.launch import cluster, jobs, preflight, restart
from bnonly_dist.launch.jobs import TrainJob
from bnonly_dist.launch.sweep import default_parallel
from bnonly_dist.run import rundir
from bnonly_dist.run.checkpoint_files import resume_hint
from bnonly_dist.run.paths import RunPaths, tensorboard_command


@dataclass(frozen=True)
class Run:
    cfg: config.Config
    run_dir: Path  # resolved
    label: str = ""  # a sweep point's overrides: its lines start "(label) "; a single run's lines carry none

    @property
    def prefix(self) -> str:
        return f"({self.label}) " if self.label else ""


@dataclass(frozen=True)
class Launch:
    prog: str  # "submit" (one run, its lines about one job) or "sweep" (a job array; its lines count points)
    runs: list[Run]  # to submit, in this order
    res: dict  # cluster.resources
    job_dir: Path
    name: str  # the job's name in Slurm
    shown: list[Path]  # every run directory of the launch (a sweep's finished points too): tensorboard, the count
    parallel: int | None = None  # sweep --parallel: runs at once here (None: as many as fit), the array's limit

    @property
    def sweep(self) -> bool:
        return self.prog == "sweep"


def main(prog: str, args, plan) -> int:
    """The launch of plan() -> a Launch (None: nothing to submit, the launcher said why), with args the parsed
    command line (local, dry_run, wait). plan runs inside the one error handling: a refusal is one line per
    problem and exit 2, a failed submission exit 1, Ctrl-C before anything was submitted exit 130."""
    try:
        launch = plan()
        if launch is None:
            return 0
        target, parallel = check(launch, args)
        if args.dry_run:
            array = len(launch.runs) if launch.sweep else None
            print(cluster.sbatch_script(launch.job_dir, launch.res, launch.name, array, launch.parallel) if target.slurm
                  else cluster.dry_run_here(target))
            if not launch.sweep:
                print(f"# run directory: {launch.runs[0].run_dir}")
            return 0
        started, train_jobs, executor = submit(launch, target)
    except KeyboardInterrupt:  # at the [y/N] question, or during the checks
        print(f"{prog}: interrupted; nothing was submitted", file=sys.stderr)
        return 130
    except (config.ConfigError, DataError) as err:
        for line in str(err).splitlines():  # preflight.Refused: one line per refusal
            print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
    except cluster.SubmissionError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    for run, job in zip(launch.runs, started):
        if job is not None:
            cluster.record_job(run.run_dir, str(job.job_id))
    _say_submitted(launch, target, started)
    if not target.slurm:
        return wait_here(launch, train_jobs, executor, started, parallel)
    return wait_slurm(launch, started) if args.wait else 0


def check(launch: Launch, args) -> tuple[cluster.Target, int]:
    """Every check that can run (a question only if none refused); prints what they found. The target, and how
    many runs go at once without Slurm."""
    runs, res = launch.runs, launch.res
    refusals, seen = preflight.Refusals(), {}
    slurm = cluster.slurm_expected(args.local)  # a dry run decides as the real command would
    lines = [refusals.check(preflight.check_data, run.cfg, slurm, seen) for run in runs]  # once per data set
    if slurm:  # the request against the partitions: every mismatch, whatever else is refused
        lines.append(refusals.check(preflight.check_cluster, res))
    ask = None if refusals.found or args.dry_run else cluster.terminal_ask()
    device = "cpu" if all(run.cfg.train.device == "cpu" for run in runs) else "auto"  # choose_target: cpu or not
    target, line = refusals.check(cluster.choose_target, res, device, args.local, ask) or (None, None)
    parallel = 1
    if target is not None:
        lines.insert(0, line)
        for run in runs:  # the BN grouping line once per distinct grouping
            bn = refusals.check(preflight.check_run, run.cfg, run.run_dir, target, preview_run_dir=args.dry_run)
            lines += [bn] if bn not in lines else []
        if not refusals.found or ask is None:  # CPU fallbacks of ImageNet configs: their cost, asked once
            answer = _first_answer(ask)
            lines += [refusals.check(preflight.local_cost, run.cfg, target, args.local, answer) for run in runs]
        if launch.sweep and not target.slurm:  # the points take turns here, as many at once as fit
            parallel, line = launch.parallel, f"{launch.parallel} point(s) at a time here (--parallel)"
            if parallel is None:
                parallel, line = refusals.check(default_parallel, runs, target.world,
                                                target.gpus_per_node) or (1, None)
            lines.append(line)
    refusals.raise_any()
    print("\n".join(x for x in lines if x))
    return target, parallel


def _first_answer(ask):
    """ask, asked once: its first answer stands for every later question (None stays None)."""
    if ask is None:
        return None
    answers: list[bool] = []

    def once(question: str) -> bool:
        if not answers:
            answers.append(ask(question))
        return answers[0]
    return once


def submit(launch: Launch, target: cluster.Target) -> tuple[list, list[TrainJob], object]:
    """Prepare the run directories and submit: under Slurm every run (a sweep as one job array); here the first
    run only (wait_here starts the rest, under its Ctrl-C handling). A failed submission takes the new run
    directories back: nothing has started in them. Returns each run's job (None: not started yet), the TrainJobs
    and the executor."""
    # Restarts are counted per series: the Slurm job id (kept across requeues; per array task), or one id per run
    # of this launch here.
    train_jobs = [TrainJob(run.cfg.to_dict(), run.run_dir, launch.res["max_failures"],
                           None if target.slurm else f"local-{uuid.uuid4().hex[:8]}") for run in launch.runs]
    with cluster.created(*(run.run_dir for run in launch.runs)), jobs.spawn_ignoring_ctrl_c():
        rundir.prepare_all([(run.cfg, run.run_dir) for run in launch.runs])
        executor = cluster.executor(launch.job_dir, launch.res, launch.name, target)
        if not target.slurm:
            started = [executor.submit(train_jobs[0])] + [None] * (len(train_jobs) - 1)
            jobs.hold_stops()  # until wait_here's handlers are set
        elif launch.sweep:
            if launch.parallel:
                executor.update_parameters(array_parallelism=launch.parallel)
            with executor.batch():  # one job array
                started = [executor.submit(t) for t in train_jobs]
        else:
            started = [executor.submit(train_jobs[0])]
    return started, train_jobs, executor


def _array_id(started: list) -> str:
    return str(started[0].job_id).split("_")[0]


def _say_submitted(launch: Launch, target: cluster.Target, started: list) -> None:
    side_by_side = tensorboard_command(*launch.shown)
    if launch.sweep and target.slurm:
        print(f"submitted {len(started)} of {len(launch.shown)} points as job array {_array_id(started)} "
              f"on {target.where}; logs in {launch.job_dir}\nall its runs side by side: {side_by_side}")
    elif launch.sweep:
        print(f"running {len(started)} point(s) here in order; all its runs side by side: {side_by_side}")
    else:
        job, paths = started[0], RunPaths(launch.runs[0].run_dir)
        print(f"job {job.job_id} on {target.where} ({target.world} task{'s' if target.world > 1 else ''})\n"
              f"run directory: {paths.root}\nlogs: {job.paths.stdout} (and .err)"
              f"\n      {paths.logs}/rank*.log\n{side_by_side}")


def wait_slurm(launch: Launch, started: list) -> int:
    """--wait under Slurm: every job's result (rank 0 holds the summary); a failure names the job and the end of its
    log, then the decision not to restart it where one was made (its last line)."""
    failed = 0
    for run, job in zip(launch.runs, started):
        try:
            job.results()  # every task
        except KeyboardInterrupt:
            what, ident = ("job array", _array_id(started)) if launch.sweep else ("job", job.job_id)
            print(f"{launch.prog}: stopped waiting; {what} {ident} goes on in Slurm (scancel {ident} stops it)",
                  file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
            failed += 1
            said = restart.refusal_line(run.run_dir, str(job.job_id))  # the series: the Slurm job (array task) id
            print(f"{run.prefix}{cluster.failure_report(job, err)}" + (f"\n{run.prefix}{said}" if said else ""),
                  file=sys.stderr)
        else:
            if not launch.sweep:
                print(f"job {job.job_id} done: {RunPaths(run.run_dir).summary}")
    if launch.sweep:
        print(f"{len(started) - failed} of {len(started)} jobs done")
    return 1 if failed else 0


POLL_S = 0.2  # how often wait_here looks at the running jobs


def wait_here(launch: Launch, train_jobs: list[TrainJob], executor, started: list, parallel: int) -> int:
    """Without Slurm: the runs on this machine in their order, at most parallel at once (started: the jobs
    already submitted, None for the rest). Ctrl-C or SIGTERM (jobs.ctrl_c): the first stops every running
    task after the same step with a checkpoint and no further run starts; a second aborts (exit 130), unless every
    running task had already stopped cleanly (then the stop is reported, exit 0). A failure a restart may cure is
    submitted again; one not retried ends in the decision's line (a traceback only where nothing decided)."""
    here = _Here(launch, train_jobs, executor, list(started))
    try:
        with jobs.ctrl_c(launch.prog, here.live) as pressed:
            here.loop(parallel, pressed)
    except (jobs.Interrupted, KeyboardInterrupt):
        if not here.stopped_cleanly():  # else the tasks had only the stop (a second signal to the launcher alone)
            return here.interrupted()
        pressed = [True]
    return here.report(pressed)


class _Here:
    """The state of wait_here: each run's last job, its summary once done, and which failed."""

    def __init__(self, launch: Launch, train_jobs: list[TrainJob], executor, started: list):
        self.launch, self.train_jobs, self.executor = launch, train_jobs, executor
        self.jobs = started + [None] * (len(launch.runs) - len(started))
        self.live = [job for job in started if job is not None]  # what ctrl_c stops and waits for
        self.running = {i for i, job in enumerate(self.jobs) if job is not None}
        self.pending = [i for i, job in enumerate(self.jobs) if job is None]
        self.summaries: dict[int, dict] = {}
        self.failed: set[int] = set()
        self.cut: set[int] = set()  # failed after the stop (a task stopped before training began, or failed while
        # stopping): a single run reports it as interrupted, with its resume hint

    def start(self, i: int):
        with jobs.spawn_ignoring_ctrl_c():
            job = self.executor.submit(self.train_jobs[i])
        self.jobs[i] = job
        self.live.append(job)
        self.running.add(i)
        return job

    def loop(self, parallel: int, pressed: list) -> None:
        while self.pending or self.running:
            while self.pending and len(self.running) < parallel and not pressed:
                i = self.pending.pop(0)
                cluster.record_job(self.launch.runs[i].run_dir, str(self.start(i).job_id))
            if pressed:
                self.pending.clear()  # the running tasks stop with a checkpoint; the rest wait for the next command
            for i in sorted(self.running):
                job = self.jobs[i]
                if job.done():
                    self.ended(i, pressed)  # i stays running until this is settled (stopped_cleanly looks there)
                    if self.jobs[i] is job:  # not restarted as a new job
                        self.running.discard(i)
            time.sleep(POLL_S)

    def ended(self, i: int, pressed: list) -> None:
        run, job, series = self.launch.runs[i], self.jobs[i], self.train_jobs[i].series
        try:
            self.summaries[i] = job.results()[0]  # every task; rank 0 holds the summary
            return
        except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
            error = err
        if not pressed and restart.restart_pending(run.run_dir, series):
            job = self.start(i)  # what a Slurm requeue would do
            history = "" if self.launch.sweep else f" (history: {RunPaths(run.run_dir).history})"
            print(f"{run.prefix}job failed, restarting as job {job.job_id}{history}", flush=True)
            return
        self.failed.add(i)
        if pressed:
            self.cut.add(i)
            if not self.launch.sweep:
                return  # said as interrupted
        said = restart.refusal_line(run.run_dir, series)  # the decision names the rank's error
        print(f"{run.prefix}{said or cluster.failure_report(job, error)}", file=sys.stderr, flush=True)

    def stopped_cleanly(self) -> bool:
        """After a second signal: every job still running had ended by a clean stop with a checkpoint."""
        for i in sorted(self.running):
            try:
                summary = self.jobs[i].results()[0] if self.jobs[i].done() else {}
            except Exception:  # noqa: BLE001 - submitit re-raises the job's failure: not a clean stop
                return False
            if not summary.get("stopped"):
                return False
            self.summaries[i] = summary
        self.running.clear()
        return True

    def interrupted(self) -> int:
        if self.launch.sweep:
            hint = "run the same command to go on (each point resumes from its last checkpoint)"
        else:
            hint = resume_hint(self.launch.runs[0].run_dir)
        print(f"{self.launch.prog}: interrupted; {hint}", file=sys.stderr)
        return 130

    def report(self, pressed: list) -> int:
        if not self.launch.sweep:
            if self.cut:  # Ctrl-C before training began: the tasks stopped where they were (nothing to save yet)
                return self.interrupted()
            if self.failed:
                return 1
            job, summary = self.jobs[0], self.summaries[0]
            if summary.get("stopped"):
                print(f"job {job.job_id} stopped at step {summary['step']} with checkpoint {summary['checkpoint']}; "
                      "run the same command to resume")
            else:
                print(f"job {job.job_id} done: {RunPaths(self.launch.runs[0].run_dir).summary}")
            return 0
        total, started = len(self.jobs), sum(job is not None for job in self.jobs)
        if pressed:  # a clean stop: the points that ran saved a checkpoint (or finished)
            print(f"stopped: {started} of {total} points ran and stopped with a checkpoint (or finished), "
                  f"{total - started} not started; run the same command to go on")
        else:
            print(f"{total - len(self.failed)} of {total} points done")
        return 1 if self.failed else 0
