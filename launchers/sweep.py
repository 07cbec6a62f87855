#!/usr/bin/env python
"""Submit a sweep (configs/sweeps/*.yaml) as one Slurm job array, one run per grid point.

    python launchers/sweep.py configs/sweeps/cifar_depth.yaml data.root=/data/cifar10

Idempotent: points whose summary.json says finished are skipped, points whose job is
still queued or running are skipped, the rest are submitted (and resume from their
checkpoints if they have any). Run it again after a crash, a preemption storm or an edit
that adds points. Every point to submit is checked (config, data, run directory, the
request against the cluster) before anything is submitted or created. A point whose job
fails in a way a restart may cure restarts from its last checkpoint, at most
--max-failures times (see launchers/submit.py). Without Slurm the points run on this machine in
order, as many at once as its cores and memory hold (--parallel N to choose).
"""
from __future__ import annotations

import argparse
import signal
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, from its own clone

from bnonly_dist.launch import cluster  # noqa: E402  (after the path above)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="a sweep file, e.g. configs/sweeps/cifar_depth.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every point (e.g. data.root=...)")
    p.add_argument("--wait", action="store_true", help="wait for every job (always, without Slurm)")
    p.add_argument("--parallel", type=int,
                   help="points running at once: without Slurm, by default as many as this machine's cores and memory "
                        "hold by the plan's estimate; under Slurm, the job array's limit (default: Slurm's)")
    cluster.add_resource_arguments(p, job_dir_default="RUNS_ROOT/sweeps/<sweep file name>")
    p.parse_known_args(argv)  # --help answers here, before the config module (pydantic, torch) loads
    from bnonly_dist.config import parse_args
    return parse_args(p, argv)


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


def main(argv=None) -> int:
    try:
        args = parse(argv)
    except KeyboardInterrupt:
        print("sweep: interrupted; nothing was submitted", file=sys.stderr)
        return 130
    from bnonly_dist.config import ConfigError
    from bnonly_dist.data.layout import DataError
    from bnonly_dist.launch import preflight, sweep
    from bnonly_dist.launch.jobs import TrainJob, spawn_ignoring_ctrl_c
    from bnonly_dist.run import rundir
    from bnonly_dist.run.paths import RunPaths, tensorboard_command
    try:
        if args.parallel is not None and args.parallel < 1:
            raise ConfigError(f"--parallel {args.parallel}: must be a whole number of at least 1; e.g. --parallel 2")
        cluster.resources(args)  # the request's numbers first (again below with the sweep's slurm: block)
        spec = sweep.load(args.sweep, args.overrides)  # every point's config, validated
        res = cluster.resources(args, spec.slurm)
        todo = []
        for point in spec.points:
            job_id = cluster.recorded_job(point.run_dir)
            if point.finished():
                status = "finished"
            elif cluster.job_alive(job_id):
                status = f"queued or running as job {job_id}"
            else:
                status = "to submit" + (" (resumes)" if RunPaths(point.run_dir).checkpoints.is_dir() else "")
                todo.append(point)
            print(f"{' '.join(point.overrides):<60} {status:<28} {point.run_dir}")
        job_dir = (args.job_dir or Path(spec.points[0].cfg.runs_root) / "sweeps" / spec.name).resolve()
        name = f"bnonly-sweep-{spec.name}"
        if not todo:
            print(f"nothing to submit: all {len(spec.points)} points are finished or in the queue")
            return 0
        # Every check that can run does, so that one try names every refusal (a question only if none).
        refusals, seen = preflight.Refusals(), {}
        slurm = cluster.slurm_expected(args.local)  # a dry run decides as the real command would
        lines = [refusals.check(preflight.check_data, p.cfg, slurm, seen) for p in todo]  # once per data set
        if slurm:  # the request against the partitions: every mismatch, whatever else is refused
            lines.append(refusals.check(preflight.check_cluster, res))
        ask = None if refusals.found or args.dry_run else cluster.terminal_ask()
        device = "cpu" if all(p.cfg.train.device == "cpu" for p in todo) else "auto"
        target, line = refusals.check(cluster.choose_target, res, device, args.local, ask) or (None, None)
        if target is not None:
            lines.insert(0, line)
            for point in todo:  # the BN grouping line once per distinct grouping
                bn = refusals.check(preflight.check_run, point.cfg, point.run_dir, target, preview_run_dir=args.dry_run)
                lines += [bn] if bn not in lines else []
            if not refusals.found or ask is None:  # CPU fallbacks of ImageNet configs: their cost, asked once
                answer = _first_answer(ask)
                lines += [refusals.check(preflight.local_cost, p.cfg, target, args.local, answer) for p in todo]
        if target is not None and not target.slurm:  # without Slurm the points take turns, as many at once as fit
            parallel, line = args.parallel, f"{args.parallel} point(s) at a time here (--parallel)"
            if parallel is None:
                parallel, line = refusals.check(sweep.default_parallel, todo, target.world,
                                                target.gpus_per_node) or (1, None)
            lines.append(line)
        refusals.raise_any()
        print("\n".join(x for x in lines if x))
        if args.dry_run:
            print(cluster.sbatch_script(job_dir, res, name, array=len(todo)) if target.slurm
                  else cluster.dry_run_here(target))
            return 0
        with cluster.created(*(p.run_dir for p in todo)), spawn_ignoring_ctrl_c():  # the launch goes ahead; see submit.py
            rundir.prepare_all([(p.cfg, p.run_dir) for p in todo])
            executor = cluster.executor(job_dir, res, name, target)
            # restarts are counted per array task under Slurm; here, per point of this launch
            train_jobs = [TrainJob(p.cfg.to_dict(), p.run_dir, res["max_failures"],
                                   None if target.slurm else f"local-{uuid.uuid4().hex[:8]}") for p in todo]
            if target.slurm:
                if args.parallel:
                    executor.update_parameters(array_parallelism=args.parallel)
                with executor.batch():  # one job array
                    jobs = [executor.submit(train_job) for train_job in train_jobs]
    except KeyboardInterrupt:  # at the [y/N] question, or during the checks
        print("sweep: interrupted; nothing was submitted", file=sys.stderr)
        return 130
    except (ConfigError, DataError) as err:
        for line in str(err).splitlines():  # preflight.Refused: one line per refusal
            print(f"sweep: error: {line}", file=sys.stderr)
        return 2
    except cluster.SubmissionError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 1
    runs_side_by_side = tensorboard_command(*(Path(p.run_dir).resolve() for p in spec.points))
    if not target.slurm:
        return run_here(todo, train_jobs, executor, parallel, runs_side_by_side)
    for point, job in zip(todo, jobs):
        cluster.record_job(point.run_dir, str(job.job_id))
    print(f"submitted {len(jobs)} of {len(spec.points)} points as job array {jobs[0].job_id.split('_')[0]} "
          f"on {target.where}; logs in {job_dir}\nall its runs side by side: {runs_side_by_side}")
    if args.wait:
        failed = 0
        for point, job in zip(todo, jobs):
            try:
                job.results()
            except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
                failed += 1
                print(f"({' '.join(point.overrides)}) {cluster.failure_report(job, err)}", file=sys.stderr)
        print(f"{len(jobs) - failed} of {len(jobs)} jobs done")
        return 1 if failed else 0
    return 0


def run_here(todo, train_jobs, executor, parallel: int, runs_side_by_side: str) -> int:
    """Without Slurm: the points on this machine, at most parallel at once (launch/sweep.run_here); Ctrl-C as with
    submit.py (jobs.ctrl_c): the running points stop with a checkpoint, the rest are not started."""
    from bnonly_dist.launch import sweep
    from bnonly_dist.launch.jobs import Interrupted, ctrl_c, spawn_ignoring_ctrl_c

    def submit(train_job):
        with spawn_ignoring_ctrl_c():
            return executor.submit(train_job)

    print(f"running {len(todo)} point(s) here in order; all its runs side by side: {runs_side_by_side}")
    live: list = []  # the jobs ctrl_c waits for after a second Ctrl-C
    try:
        with ctrl_c("sweep", live) as pressed:
            jobs, failed = sweep.run_here(todo, train_jobs, lambda j: live.append(submit(j)) or live[-1], parallel,
                                          pressed)
    except (Interrupted, KeyboardInterrupt):
        print("sweep: interrupted; run the same command to go on (each point resumes from its last checkpoint)",
              file=sys.stderr)
        return 130
    started = sum(job is not None for job in jobs)
    if pressed:  # a clean stop: the points that ran saved a checkpoint (or finished)
        print(f"stopped: {started} of {len(jobs)} points ran and stopped with a checkpoint (or finished), "
              f"{len(jobs) - started} not started; run the same command to go on")
    else:
        print(f"{len(jobs) - failed} of {len(jobs)} points done")
    return 1 if failed else 0

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill during the checks: as Ctrl-C, nothing submitted
    sys.exit(main())
