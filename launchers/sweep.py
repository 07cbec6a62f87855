#!/usr/bin/env python
"""Submit a sweep (configs/sweeps/*.yaml) as one Slurm job array, one run per grid point.

    python launchers/sweep.py configs/sweeps/cifar_depth.yaml data.root=/data/cifar10

Idempotent: points whose summary.json says finished are skipped, points whose job is
still queued or running are skipped, the rest are submitted (and resume from their
checkpoints if they have any). Run it again after a crash, a preemption storm or an edit
that adds points.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnonly_dist import cluster, sweep
from bnonly_dist.config import ConfigError, parse_args
from bnonly_dist.jobs import TrainJob
from bnonly_dist.rundir import prepare as prepare_run_dir


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="a sweep file, e.g. configs/sweeps/cifar_depth.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every point (e.g. data.root=...)")
    p.add_argument("--wait", action="store_true", help="wait for every job (always, without Slurm)")
    cluster.add_resource_arguments(p)
    return parse_args(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        spec = sweep.load(args.sweep, args.overrides)
        res = cluster.resources(args, spec.slurm)
        todo = []
        for point in spec.points:
            job_id = cluster.recorded_job(point.run_dir)
            if point.finished():
                status = "finished"
            elif cluster.job_alive(job_id):
                status = f"queued or running as job {job_id}"
            else:
                status = "to submit" + (" (resumes)" if (point.run_dir / "checkpoints").is_dir() else "")
                todo.append(point)
            print(f"{' '.join(point.overrides):<60} {status:<28} {point.run_dir}")
        job_dir = (args.job_dir or Path(spec.points[0].cfg.runs_root) / "sweeps" / spec.name).resolve()
        name = f"bnonly-sweep-{spec.name}"
        if args.dry_run:
            print(cluster.sbatch_script(job_dir, res, name, array=len(todo)) if todo else "# nothing to submit")
            return 0
        if not todo:
            print(f"nothing to submit: all {len(spec.points)} points are finished or in the queue")
            return 0
        for point in todo:
            prepare_run_dir(point.cfg, point.run_dir)
        executor = cluster.executor(job_dir, res, name, local=args.local)
        with executor.batch():  # one job array
            jobs = [executor.submit(TrainJob(p.cfg.to_dict(), p.run_dir)) for p in todo]
    except ConfigError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    for point, job in zip(todo, jobs):
        cluster.record_job(point.run_dir, str(job.job_id))
    print(f"submitted {len(jobs)} of {len(spec.points)} points as job array {jobs[0].job_id.split('_')[0]}; "
          f"logs in {job_dir}; tensorboard --logdir {Path(spec.points[0].cfg.runs_root).resolve()}")
    if args.wait or args.local or not cluster.slurm_available():
        failed = 0
        for point, job in zip(todo, jobs):
            try:
                job.results()
            except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
                failed += 1
                print(f"job {job.job_id} ({' '.join(point.overrides)}) failed: {str(err).strip().splitlines()[-1]}",
                      file=sys.stderr)
        print(f"{len(jobs) - failed} of {len(jobs)} jobs done")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
