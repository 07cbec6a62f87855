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
process group this machine holds; --local runs all nodes x tasks here.
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
    from bnonly_dist.data.layout import DataError
    from bnonly_dist.launch import jobs, preflight
    from bnonly_dist.launch.jobs import TrainJob
    from bnonly_dist.run import rundir
    from bnonly_dist.run.paths import RunPaths, run_dir, tensorboard_command
    try:
        res = cluster.resources(args)  # every number of the request first: nothing below divides by a bad one
        cfg = config.load(args.config, args.overrides)
        paths = RunPaths(run_dir(cfg, args.run_dir).resolve())
        job_dir = (args.job_dir or paths.slurm).resolve()
        # Every check that can run does, so that one try names every refusal (a question only if none).
        slurm = cluster.slurm_expected(args.local)  # a dry run decides as the real command would
        refusals = preflight.Refusals()
        lines = [refusals.check(preflight.check_data, cfg, slurm)]
        if slurm:  # the request against the partitions: every mismatch, whatever else is refused
            lines.append(refusals.check(preflight.check_cluster, res))
        ask = None if refusals.found or args.dry_run else cluster.terminal_ask()
        target, line = refusals.check(cluster.choose_target, res, cfg.train.device, args.local, ask) or (None, None)
        if target is not None:
            lines.insert(0, line)
            lines.append(refusals.check(preflight.check_run, cfg, paths.root, target, preview_run_dir=args.dry_run))
            if not refusals.found or ask is None:  # a CPU fallback of an ImageNet config: its cost, asked
                lines.append(refusals.check(preflight.local_cost, cfg, target, args.local, ask))
        refusals.raise_any()
        print("\n".join(x for x in lines if x))
        name = f"bnonly-{paths.root.name}"[:100]
        if args.dry_run:
            print(cluster.sbatch_script(job_dir, res, name) if target.slurm else cluster.dry_run_here(target))
            print(f"# run directory: {paths.root}")
            return 0
        # Restarts are counted per series: the Slurm job id (kept across requeues), or one id for this launch here.
        train_job = TrainJob(cfg.to_dict(), paths.root, res["max_failures"],
                             None if target.slurm else f"local-{uuid.uuid4().hex[:8]}")
        with cluster.created(paths.root), jobs.spawn_ignoring_ctrl_c():  # a failed submission takes the new run dir back
            rundir.prepare(cfg, paths.root)
            executor = cluster.executor(job_dir, res, name, target)
            job = executor.submit(train_job)
            if not target.slurm:
                jobs.hold_stops()  # until wait_here's handlers are set
    except KeyboardInterrupt:  # at the [y/N] question, or during the checks
        print("submit: interrupted; nothing was submitted", file=sys.stderr)
        return 130
    except (config.ConfigError, DataError) as err:
        for line in str(err).splitlines():  # preflight.Refused: one line per refusal
            print(f"submit: error: {line}", file=sys.stderr)
        return 2
    except cluster.SubmissionError as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 1
    cluster.record_job(paths.root, str(job.job_id))
    print(f"job {job.job_id} on {target.where} ({target.world} task{'s' if target.world > 1 else ''})\n"
          f"run directory: {paths.root}\nlogs: {job.paths.stdout} (and .err)"
          f"\n      {paths.logs}/rank*.log\n{tensorboard_command(paths.root)}")
    if not target.slurm:
        return wait_here(job, paths, executor, train_job)
    if args.wait:
        try:
            job.results()  # every task; rank 0 holds the summary
        except KeyboardInterrupt:
            print(f"submit: stopped waiting; job {job.job_id} goes on in Slurm (scancel {job.job_id} stops it)",
                  file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
            print(cluster.failure_report(job, err), file=sys.stderr)
            return 1
        print(f"job {job.job_id} done: {paths.summary}")
    return 0


def wait_here(job, paths, executor, train_job) -> int:
    """Wait for a job on this machine; Ctrl-C stops it like `bnonly train` (jobs.ctrl_c), and a failure a
    restart may cure is submitted again, as a Slurm requeue would (launch/restart.py decides)."""
    from bnonly_dist.cli import resume_hint
    from bnonly_dist.launch import jobs, restart
    from bnonly_dist.run.checkpoint import complete_checkpoints
    while True:
        pressed: list[bool] = []
        try:
            with jobs.ctrl_c("submit", [job]) as pressed:
                summary = job.results()[0]  # every task; rank 0 holds the summary
            break
        except jobs.Interrupted:
            summary = _stopped(job)
            if summary is None:
                print(f"submit: interrupted; {resume_hint(paths.root, complete_checkpoints(paths.root))}",
                      file=sys.stderr)
                return 130
            break  # the tasks had only the stop (a second signal to the launcher alone): they stopped cleanly
        except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
            if pressed:  # Ctrl-C before training began: the tasks stopped where they were (nothing to save yet)
                print(f"submit: interrupted; {resume_hint(paths.root, complete_checkpoints(paths.root))}",
                      file=sys.stderr)
                return 130
            if not restart.restart_pending(paths.root, train_job.series):
                # The decision names the rank's error; the traceback only where nothing decided.
                print(restart.refusal_line(paths.root, train_job.series) or cluster.failure_report(job, err),
                      file=sys.stderr)
                return 1
            with jobs.spawn_ignoring_ctrl_c():
                job = executor.submit(train_job)  # without Slurm the launcher does what a requeue does
            print(f"job failed, restarting as job {job.job_id} (history: {paths.history})")
    if summary.get("stopped"):
        print(f"job {job.job_id} stopped at step {summary['step']} with checkpoint {summary['checkpoint']}; "
              "run the same command to resume")
    else:
        print(f"job {job.job_id} done: {paths.summary}")
    return 0


def _stopped(job) -> dict | None:
    """rank 0's summary if the job ended by a clean stop with a checkpoint, else None."""
    if not job.done():
        return None
    try:
        summary = job.results()[0]
    except Exception:  # noqa: BLE001 - submitit re-raises the job's failure: not a clean stop
        return None
    return summary if summary.get("stopped") else None


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill during the checks: as Ctrl-C, nothing submitted
    sys.exit(main())
