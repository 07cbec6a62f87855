#!/usr/bin/env python
"""Submit one training run to Slurm with submitit (or run it here if there is no Slurm).

    python launchers/submit.py --nodes 8 --gpus-per-node 8 configs/imagenet_resnet200.yaml data.root=/data/imagenet
    python launchers/submit.py configs/demo.yaml            # no Slurm here: runs on this machine

One task per GPU. The job saves and requeues itself on SIGUSR2 (sent --signal seconds
before the time limit, or on preemption) and resumes from its run directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnonly_dist import cluster, config
from bnonly_dist.config import parse_args
from bnonly_dist.data.layout import DataError
from bnonly_dist.jobs import TrainJob
from bnonly_dist.rundir import prepare as prepare_run_dir


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config, e.g. configs/imagenet_resnet50.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--run-dir", type=Path, help="default: RUNS_ROOT/<derived from the config>")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result (always, without Slurm)")
    cluster.add_resource_arguments(p)
    return parse_args(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        run_dir = (args.run_dir or Path(cfg.runs_root) / cfg.run_name()).resolve()
        job_dir = (args.job_dir or run_dir / "slurm").resolve()
        res = cluster.resources(args)
        name = f"bnonly-{run_dir.name}"[:100]
        if args.dry_run:
            print(cluster.sbatch_script(job_dir, res, name))
            print(f"# run directory: {run_dir}")
            return 0
        prepare_run_dir(cfg, run_dir)  # refuses a run dir that holds another config
        executor = cluster.executor(job_dir, res, name, local=args.local)
        job = executor.submit(TrainJob(cfg.to_dict(), run_dir))
    except (config.ConfigError, DataError) as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2
    cluster.record_job(run_dir, str(job.job_id))
    on_slurm = cluster.slurm_available() and not args.local
    where = "Slurm" if on_slurm else "this machine"
    print(f"job {job.job_id} on {where}\nrun directory: {run_dir}\nlogs: {job.paths.stdout}"
          f"\n      {run_dir / 'logs'}/rank*.log\ntensorboard --logdir {run_dir / 'tb'}")
    if args.wait or not on_slurm:
        try:
            job.results()  # every task; rank 0 holds the summary
        except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
            print(f"job {job.job_id} failed: {str(err).strip().splitlines()[-1]}\nsee {job.paths.stdout}",
                  file=sys.stderr)
            return 1
        print(f"job {job.job_id} done: {run_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
