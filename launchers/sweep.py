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
order, as many at once as its cores and memory hold (--parallel N to choose). The flow itself is
bnonly_dist/launch/submission.py, as for submit.py.
"""
from __future__ import annotations

import argparse
import signal
import sys
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


def main(argv=None) -> int:
    try:
        args = parse(argv)
    except KeyboardInterrupt:
        print("sweep: interrupted; nothing was submitted", file=sys.stderr)
        return 130
    from bnonly_dist.config import ConfigError
    from bnonly_dist.launch import submission, sweep
    from bnonly_dist.run.paths import RunPaths

    def plan() -> submission.Launch | None:
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
                todo.append(submission.Run(point.cfg, point.run_dir, " ".join(point.overrides)))
            print(f"{' '.join(point.overrides):<60} {status:<28} {point.run_dir}")
        if not todo:
            print(f"nothing to submit: all {len(spec.points)} points are finished or in the queue")
            return None
        job_dir = (args.job_dir or Path(spec.points[0].cfg.runs_root) / "sweeps" / spec.name).resolve()
        return submission.Launch("sweep", todo, res, job_dir, f"bnonly-sweep-{spec.name}",
                                 [p.run_dir for p in spec.points], args.parallel)
    return submission.main("sweep", args, plan)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill during the checks: as Ctrl-C, nothing submitted
    sys.exit(main())
