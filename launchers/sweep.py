#!/usr/bin/env python
"""Submit a sweep (configs/sweeps/*.yaml) as one Slurm job array, one run per grid point.

    python launchers/sweep.py configs/sweeps/cifar_depth.yaml data.root=/data/cifar10

Idempotent: points whose summary.json says finished are skipped, points whose job is
still queued or running are skipped, the rest are submitted (and resume from their
checkpoints if they have any). Run it again after a crash, a preemption storm or an edit
that adds points. Every point to submit is checked (config, data, run directory, the
request against the cluster) before anything is submitted or created. A point whose job
fails in a way a restart may cure restarts from its last checkpoint, at most
--max-failures times (see launchers/submit.py).
"""
from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from bnonly_dist.launch import cluster


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="a sweep file, e.g. configs/sweeps/cifar_depth.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every point (e.g. data.root=...)")
    p.add_argument("--wait", action="store_true", help="wait for every job (always, without Slurm)")
    cluster.add_resource_arguments(p, job_dir_default="RUNS_ROOT/sweeps/<sweep file name>")
    p.parse_known_args(argv)  # --help answers here, before the config module (pydantic, torch) loads
    from bnonly_dist.config import parse_args
    return parse_args(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    from bnonly_dist.config import ConfigError
    from bnonly_dist.data.layout import DataError
    from bnonly_dist.launch import preflight, restart, sweep
    from bnonly_dist.launch.jobs import TrainJob
    from bnonly_dist.run import rundir
    from bnonly_dist.run.paths import RunPaths
    try:
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
        for point in todo:
            preflight.require_data(point.cfg)
        device = "cpu" if all(p.cfg.train.device == "cpu" for p in todo) else "auto"
        target, line = cluster.choose_target(res, device, args.local, args.dry_run, cluster.terminal_ask())
        lines, seen = [line], {}
        if target.slurm and not args.dry_run:
            lines.append(preflight.check_capacity(res))  # a job no partition can run would pend forever
        for point in todo:
            lines += preflight.check_run(point.cfg, point.run_dir, target, seen, preview_run_dir=args.dry_run)
        print("\n".join(x for x in lines if x))
        if args.dry_run:
            print(cluster.sbatch_script(job_dir, res, name, array=len(todo)))
            return 0
        with cluster.created(*(p.run_dir for p in todo)):  # the launch goes ahead; see submit.py
            rundir.prepare_all([(p.cfg, p.run_dir) for p in todo])
            executor = cluster.executor(job_dir, res, name, target)
            with executor.batch():  # one job array
                # restarts are counted per array task under Slurm; here, per point of this launch
                train_jobs = [TrainJob(p.cfg.to_dict(), p.run_dir, res["max_failures"],
                                       None if target.slurm else f"local-{uuid.uuid4().hex[:8]}") for p in todo]
                jobs = [executor.submit(train_job) for train_job in train_jobs]
    except (ConfigError, DataError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    except cluster.SubmissionError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 1
    for point, job in zip(todo, jobs):
        cluster.record_job(point.run_dir, str(job.job_id))
    print(f"submitted {len(jobs)} of {len(spec.points)} points as job array {jobs[0].job_id.split('_')[0]} "
          f"on {target.where}; logs in {job_dir}; tensorboard --logdir {Path(spec.points[0].cfg.runs_root).resolve()}")
    if args.wait or not target.slurm:
        failed = 0
        for point, job, train_job in zip(todo, jobs, train_jobs):
            while True:
                try:
                    job.results()
                    break
                except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
                    if target.slurm or not restart.restart_pending(point.run_dir, train_job.series):
                        failed += 1
                        print(f"({' '.join(point.overrides)}) {cluster.failure_report(job, err)}", file=sys.stderr)
                        break
                    job = executor.submit(train_job)  # without Slurm the launcher does what a requeue does
                    print(f"({' '.join(point.overrides)}) job failed, restarting as job {job.job_id}")
        print(f"{len(jobs) - failed} of {len(jobs)} jobs done")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
