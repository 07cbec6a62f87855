#!/usr/bin/env python
"""Submit one training run to Slurm with submitit (or run it on this machine if there is no Slurm).

    python launchers/submit.py --nodes 8 --gpus-per-node 8 configs/imagenet_resnet200.yaml data.root=/data/imagenet
    python launchers/submit.py configs/demo.yaml            # no Slurm here: runs on this machine

Before anything is submitted or created, the config, the data set (where its path is
visible here), the run directory and the request against the cluster's partitions are
checked; a refusal is one line and exit status 2. One task per GPU. The job saves and
requeues itself on SIGUSR2 (sent --signal-delay-s seconds before the time limit, or on
preemption) and resumes from its run directory; after a failure a restart may cure (a
lost rank or node) it restarts from its last checkpoint, at most --max-failures times. Without Slurm the job runs here as the
process group this machine holds; --local runs all nodes x tasks here. The flow itself (checks, submission,
waiting, local restarts) is bnonly_dist/launch/submission.py.
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
    p.add_argument("config", help="YAML config, e.g. configs/imagenet_resnet50.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--run-dir", type=Path, help="default: RUNS_ROOT/<derived from the config>")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result (always, without Slurm)")
    cluster.add_resource_arguments(p)
    p.parse_known_args(argv)  # --help answers here, before the config module (pydantic, torch) loads
    from bnonly_dist.config import parse_args
    return parse_args(p, argv)


def main(argv=None) -> int:
    try:
        args = parse(argv)
    except KeyboardInterrupt:
        print("submit: interrupted; nothing was submitted", file=sys.stderr)
        return 130
    from bnonly_dist import config
    from bnonly_dist.launch import submission
    from bnonly_dist.run.paths import RunPaths, run_dir

    def plan() -> submission.Launch:
        res = cluster.resources(args)  # every number of the request first: nothing below divides by a bad one
        cfg = config.load(args.config, args.overrides)
        paths = RunPaths(run_dir(cfg, args.run_dir).resolve())
        return submission.Launch("submit", [submission.Run(cfg, paths.root)], res,
                                 (args.job_dir or paths.slurm).resolve(), f"bnonly-{paths.root.name}"[:100],
                                 [paths.root])
    return submission.main("submit", args, plan)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill during the checks: as Ctrl-C, nothing submitted
    sys.exit(main())
