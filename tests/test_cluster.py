"""Launcher pieces that need no cluster: resources, time formats, dry runs, the local executor."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnonly_dist.config import ConfigError
from bnonly_dist.launch import cluster, submission, sweep


def submit(*args, env=None):
    return subprocess.run([sys.executable, "launchers/submit.py", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("text, minutes", [("90", 90), ("10:30", 11), ("24:00:00", 1440), ("1-12", 2160),
                                           ("2-01:30", 2970), ("0-00:05:00", 5)])
def test_slurm_time_formats(text, minutes):
    assert cluster.minutes(text) == minutes


@pytest.mark.parametrize("text", ["12h", "-5", "-1-00:00", "1--2", "5:", ":5", "1:2:3:4", "1-2:3:4:5", "+5", "1.5", ""])
def test_bad_time_is_named(text):
    """A sign, a unit or a malformed field is refused, never read as another time (-5 was once 5 minutes)."""
    with pytest.raises(ConfigError, match=re.escape(f"--time {text!r} is not minutes")):
        cluster.minutes(text)


def slurm_here(tmp_path, sinfo: str) -> dict:
    """An environment whose sinfo prints sinfo and whose sbatch must not be called (a dry run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\nprintf '%s' '{sinfo}'\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sinfo", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}",
            "BNONLY_CLUSTER_FILE": str(tmp_path / "none.yaml")}


def test_dry_run_prints_the_sbatch_script(tmp_path):
    env = slurm_here(tmp_path, "gpu 4 gpu:a100:8 96 1-infinite\ndebug* 2 (null) 8 1-infinite\n")
    defaults = tmp_path / "cluster.yaml"
    defaults.write_text("partition: gpu\naccount: lab\ngpus_per_node: 8\nsetup: ['module load cuda']\n")
    env["BNONLY_CLUSTER_FILE"] = str(defaults)
    out = submit("--nodes", "4", "--time", "2-00:00:00", "--qos", "high", "--exclude", "gpu[03,07]", "--dry-run",
                 "configs/imagenet_resnet200.yaml", "data.root=/data/imagenet", env=env)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=lab",
                 "--qos=high", "--exclude='gpu[03,07]'", "--time=2880", "--signal=USR2@120", "module load cuda",
                 "--cpus-per-task=12"):  # the partition's 96 CPUs per node for its 8 GPUs
        assert line in script, line
    assert "--cpus-per-task 12: partition gpu's nodes have 96 CPUs for 8 GPUs (--cpus-per-task N to choose)" in script
    assert "srun" in script and "# run directory:" in script
    # a flag beats the cluster file
    out = submit("--partition", "debug", "--gpus-per-node", "0", "--dry-run", "configs/demo.yaml", env=env).stdout
    assert "--partition=debug" in out and "--cpus-per-task=8" in out


def test_a_sweeps_dry_run_shows_the_array_limit_it_submits_with(tmp_path, monkeypatch):
    """--parallel N under Slurm: the script shows %N, as the job array is submitted (executor's array_parallelism)."""
    import argparse
    monkeypatch.setenv("BNONLY_CLUSTER_FILE", str(tmp_path / "none.yaml"))
    parser = argparse.ArgumentParser()
    cluster.add_resource_arguments(parser)
    res = cluster.resources(parser.parse_args(["--gpus-per-node", "0"]))
    assert "#SBATCH --array=0-4%2" in cluster.sbatch_script(tmp_path, res, "sweep", 5, 2)
    assert "#SBATCH --array=0-4%5" in cluster.sbatch_script(tmp_path, res, "sweep", 5)  # submitit's default: all


@pytest.mark.parametrize("sinfo, line, cpus", [
    ("gpu* 2 gpu:h100:8 224 1-infinite\n", "partition gpu's nodes have 224 CPUs for 8 GPUs, capped at 16", 16),
    ("gpu* 2 gpu:h100:8 224 1-infinite\ngpu* 2 gpu:a100:8 64 1-infinite\ngpu* 1 gpu:v100:4 80 1-infinite\n",
     "partition gpu's nodes have 64 CPUs for 8 GPUs", 8),  # the fewest CPUs of the nodes with 8 GPUs
    ("gpu* 2 gpu:8 4 1-infinite\n", "partition gpu's nodes have 4 CPUs for 8 GPUs", 1),
])
def test_cpus_per_task_comes_from_the_partition(sinfo, line, cpus):
    from bnonly_dist.launch import preflight
    res = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": None}
    assert line in preflight.settle_cpus_per_task(res, preflight.parse_sinfo(sinfo)) and res["cpus_per_task"] == cpus
    res = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 3}  # a flag or the cluster file wins
    assert preflight.settle_cpus_per_task(res, preflight.parse_sinfo(sinfo)) is None and res["cpus_per_task"] == 3
    res = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": None}  # sinfo cannot say: the old default
    assert preflight.settle_cpus_per_task(res, None) is None and res["cpus_per_task"] == cluster.DEFAULT_CPUS_PER_TASK


def test_gpus_per_node_must_be_said_for_slurm(tmp_path):
    out = submit("--dry-run", "configs/demo.yaml", env=slurm_here(tmp_path, "debug* 2 (null) 8 1-infinite\n"))
    assert out.returncode == 2 and "--gpus-per-node is not set" in out.stderr


def test_cluster_file_with_an_unknown_key_is_named(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("partitoin: gpu\n")
    out = submit("--dry-run", "configs/demo.yaml", env={**os.environ, "BNONLY_CLUSTER_FILE": str(bad)})
    assert out.returncode == 2 and "unknown key 'partitoin'" in out.stderr


def test_local_executor_runs_the_job_here_on_two_tasks(cifar_root, tmp_path):
    out = submit("--local", "--tasks-per-node", "2", "--gpus-per-node", "0", "configs/cifar10_resnet14.yaml",
                 f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "optim.epochs=1", "train.device=cpu",
                 "train.progress=lines", "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on this machine" in out.stdout and "done" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world"] == 2 and summary["finished"] and summary["final"]["count"] == 103


def test_sweep_expands_the_grid_into_distinct_run_dirs(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("config: /work/main/configs/cifar10_resnet14.yaml\n"
                    "grid: {seed: [0, 1, 2], mode: [bn, all]}\noverrides: {optim.epochs: 3, runs_root: R}\n"
                    .replace("/work/main", str(Path.cwd())))
    loaded = sweep.load(spec, ["data.root=/x"])
    assert len(loaded.points) == 6 and len({p.run_dir for p in loaded.points}) == 6
    assert {p.cfg.seed for p in loaded.points} == {0, 1, 2} and all(p.cfg.optim.epochs == 3 for p in loaded.points)
    assert loaded.points[0].overrides == ("seed=0", "mode=bn")
    spec.write_text("config: x.yaml\ngrid: {seed: 3}\n")
    with pytest.raises(ConfigError, match="grid.seed must be a non-empty list"):
        sweep.load(spec)


def test_malformed_cluster_file_is_named(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("partition: [gpu\n")
    out = submit("--dry-run", "configs/demo.yaml", env={**os.environ, "BNONLY_CLUSTER_FILE": str(bad)})
    assert out.returncode == 2 and "not valid YAML" in out.stderr and out.stderr.count("\n") == 1
    bad.write_text("- gpu\n")
    out = submit("--dry-run", "configs/demo.yaml", env={**os.environ, "BNONLY_CLUSTER_FILE": str(bad)})
    assert out.returncode == 2 and "must hold a mapping" in out.stderr


class FakeJob:
    """A job of the local executor as wait_here sees it: done after `steps` polls, then its result or failure."""

    def __init__(self, log, point, fail=False, steps=3):
        self.job_id, self.point, self.fail, self.steps, self.log = f"{point}-{len(log)}", point, fail, steps, log

    def done(self):
        self.steps -= 1
        return self.steps <= 0

    def results(self):
        self.log.append(("end", self.point))
        if self.fail:
            raise RuntimeError("failed")
        return [{}]


def _points(tmp_path, n):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"config: {Path.cwd() / 'configs/cifar10_resnet14.yaml'}\ngrid: {{seed: {list(range(n))}}}\n"
                    f"overrides: {{runs_root: {tmp_path / 'runs'}}}\n")
    return sweep.load(spec, ["data.root=/x"]).points


def _run_here(points, train_jobs, submit, parallel, pressed):
    """submission's local loop over the points, none started yet: every point's last job and the count failed."""
    launch = submission.Launch("sweep", [submission.Run(p.cfg, p.run_dir, " ".join(p.overrides)) for p in points],
                               {}, Path("unused"), "unused", [p.run_dir for p in points])
    here = submission._Here(launch, train_jobs, type("Executor", (), {"submit": staticmethod(submit)})(), [])
    here.loop(parallel, pressed)
    return here.jobs, len(here.failed)


def test_a_local_sweep_runs_its_points_in_order_at_most_parallel_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(submission.time, "sleep", lambda s: None)
    points, log = _points(tmp_path, 5), []
    train_jobs = [type("TJ", (), {"series": f"s{i}", "point": i})() for i in range(5)]

    def submit(train_job):
        log.append(("start", train_job.point))
        return FakeJob(log, train_job.point, steps=2 + train_job.point % 2)

    jobs, failed = _run_here(points, train_jobs, submit, 2, [])
    assert failed == 0 and all(jobs)
    starts = [p for kind, p in log if kind == "start"]
    assert starts == [0, 1, 2, 3, 4]  # the sweep's order
    running = peak = 0
    for kind, _ in log:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    assert all((p.run_dir / "slurm" / "job_id").read_text().startswith(f"{i}-") for i, p in enumerate(points))
    # after Ctrl-C no further point starts; the running ones end as they do
    log.clear()
    pressed = []

    def submit_then_press(train_job):
        pressed.append(True)
        return submit(train_job)
    jobs, failed = _run_here(points, train_jobs, submit_then_press, 2, pressed)
    assert [p for kind, p in log if kind == "start"] == [0] and jobs[1:] == [None] * 4


def test_a_local_sweep_takes_as_many_points_as_cores_and_memory_hold(tmp_path, monkeypatch):
    from bnonly_dist.data import threads
    from bnonly_dist.models import memory
    points = _points(tmp_path, 6)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(memory, "rank_memory_bytes", lambda device: 64 * 2**30)
    n, line = sweep.default_parallel(points, 1, 0)
    assert n == 8 and line.startswith("8 points at a time here: this machine's 8 cores and 64 GiB for 1 process(es) "
                                      "per point of about ") and line.endswith("--parallel N to choose")
    assert sweep.default_parallel(points, 2, 0)[0] == 4  # two processes per point
    monkeypatch.setattr(memory, "rank_memory_bytes", lambda device: 2**30)  # memory binds before cores
    assert sweep.default_parallel(points, 1, 0)[0] == 1
    assert sweep.default_parallel(points, 1, 4) == (1, "one point at a time here (each uses this machine's 4 GPUs)")
