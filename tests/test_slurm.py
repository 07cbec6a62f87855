"""On a real Slurm (slurm/local-cluster/up.sh: node1 and node2 on this machine). Skipped
where no cluster answers, except under CI=true, where the cluster must be up."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import history_rows
from launch import run as run_processes

from bnonly_dist.launch import restart

REPO = Path(__file__).resolve().parents[1]


def cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not cluster_up():
        if os.environ.get("CI") == "true":
            pytest.fail("no Slurm cluster answers: CI must run slurm/local-cluster/up.sh first")
        pytest.skip("no Slurm cluster (bring one up with slurm/local-cluster/up.sh)")


@pytest.fixture(scope="module")
def overrides(cifar_root):
    return [f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "data.eval_batch_size=50", "optim.epochs=3",
            "optim.milestones=[2]", "train.device=cpu", "train.deterministic=true", "train.checkpoint_every=4",
            "train.progress=lines"]


@pytest.fixture(scope="module")
def uninterrupted(overrides, tmp_path_factory) -> str:
    """The fingerprint of the run never interrupted, 2 local processes (what every resumed job must end with)."""
    return run_processes(2, overrides, tmp_path_factory.mktemp("uninterrupted") / "run")["fingerprint"]


CPU_JOB = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "15"]


def launcher(script: str, *args, wait: bool = True):
    cmd = [sys.executable, str(REPO / "launchers" / script), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def wait_until(condition, timeout=180, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def squeue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def wait_for_requeue(job_id: str) -> None:
    """The job went back to the queue (the local cluster holds requeued jobs ~10 s, real ones ~2 min)."""
    wait_until(lambda: squeue(job_id) == "PENDING", what=f"job {job_id} to be requeued")


def test_submit_trains_across_two_nodes(overrides, tmp_path):
    run_dir = tmp_path / "run"
    out = launcher("submit.py", "--nodes", "2", *CPU_JOB, "--wait", "configs/cifar10_resnet14.yaml", *overrides,
                   "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = (run_dir / "slurm" / "job_id").read_text().strip()
    assert f"job {job_id} on Slurm" in out.stdout and f"tensorboard --logdir_spec {run_dir.name}:{run_dir}" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 2 and summary["finished"] and summary["final"]["count"] == 103
    task_logs = [(run_dir / "slurm" / f"{job_id}_{t}_log.out").read_text() for t in (0, 1)]
    assert "node=0(2)" in task_logs[0] and "node=1(2)" in task_logs[1]  # one task on each node


def test_a_preempted_job_requeues_resumes_and_ends_bit_identical(overrides, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    submit = launcher("submit.py", "--nodes", "2", *CPU_JOB, "--wait", "configs/cifar10_resnet14.yaml", *overrides,
                      "--run-dir", str(run_dir), wait=False)
    wait_until(lambda: (run_dir / "checkpoints" / "step_00000008" / "commit.json").is_file(), what="a checkpoint")
    job_id = (run_dir / "slurm" / "job_id").read_text().strip()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what Slurm sends before a preemption
    wait_for_requeue(job_id)
    output, _ = submit.communicate(timeout=300)
    assert submit.returncode == 0, output[-4000:]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "received SIGUSR2" in log and "resumed from" in log
    assert f"Requeued job {job_id}" in (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()  # by submitit
    assert json.loads((run_dir / "summary.json").read_text())["fingerprint"] == uninterrupted


def test_sbatch_script_requeues_itself_after_a_stop_signal(overrides, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "BNONLY": str(Path(sys.executable).parent / "bnonly")}
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task",
         "1", "--time", "15", "--output", str(tmp_path / "slurm-%j.out"), str(REPO / "slurm" / "train.sbatch"),
         str(REPO / "configs" / "cifar10_resnet14.yaml"), *overrides, f"runs_root={runs}"],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout.strip()
    wait_until(lambda: list(runs.glob("*/checkpoints/step_00000008/commit.json")), what="a checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for_requeue(job_id)
    wait_until(lambda: list(runs.glob("*/summary.json")), timeout=300, what="the requeued job to finish")
    run_dir = next(runs.iterdir())
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert "requeueing job" in (tmp_path / f"slurm-{job_id}.out").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["world"] == 2
    assert events(run_dir) == [("stop", None)]  # the requeue it asked for is no failure


def test_a_sweep_completes_and_a_second_submission_submits_nothing(cifar_root, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"config: {REPO / 'configs' / 'cifar10_resnet14.yaml'}\n"
                    "grid: {seed: [0, 1], mode: [bn, output]}\n"
                    f"overrides: {{data.root: {cifar_root}, data.batch_size: 32, train.bn_batch: 32, optim.epochs: 1, "
                    f"train.device: cpu, train.progress: lines, runs_root: {tmp_path / 'runs'}}}\n")
    first = launcher("sweep.py", str(spec), *CPU_JOB, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "submitted 4 of 4 points as job array" in first.stdout and "4 of 4 jobs done" in first.stdout
    summaries = list((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 4 and all(json.loads(p.read_text())["finished"] for p in summaries)
    second = launcher("sweep.py", str(spec), *CPU_JOB)
    assert second.returncode == 0 and "nothing to submit" in second.stdout and "submitted" not in second.stdout
    assert all(" finished " in line for line in second.stdout.splitlines()[:4])


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "3", "--gpus-per-node", "0", "--cpus-per-task", "1"],
     "--nodes 3 but partition debug has 2 node(s); ask for at most 2"),
    (["--gpus-per-node", "1", "--cpus-per-task", "1"], "--gpus-per-node 1 but no nodes of partition debug have 1 GPU"),
    (["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "8"], "= 16 CPUs per node, but no nodes"),
])
def test_a_request_the_partition_cannot_meet_is_refused_before_sbatch(overrides, tmp_path, flags, message):
    run_dir = tmp_path / f"refused-{tmp_path.name}"  # the job name bnonly-<run dir name> is this test's alone
    out = launcher("submit.py", *flags, "configs/cifar10_resnet14.yaml", *overrides, "--run-dir", str(run_dir))
    lines = out.stderr.strip().splitlines()  # every refusal at once, one line each (3 nodes: the batch too)
    assert out.returncode == 2 and any(message in line for line in lines), out.stdout + out.stderr
    assert all(line.startswith("submit: error: ") for line in lines), out.stderr
    assert not run_dir.exists()
    # -t all: also jobs that already ended, which slurmctld keeps for MinJobAge (300 s)
    submitted = subprocess.run(["squeue", "-h", "-t", "all", "-n", f"bnonly-{run_dir.name}"], capture_output=True,
                               text=True, check=True)
    assert submitted.stdout.strip() == ""


def training_pid(job_id: str, rank: int) -> int | None:
    """The training process (`bnonly train`, the child of the submitit task) of rank of a Slurm job."""
    return job_process(job_id, rank, "bnonly_dist.cli\0train")


def task_pid(job_id: str, rank: int) -> int | None:
    """The submitit task process of rank of a Slurm job."""
    return job_process(job_id, rank, "submitit.core._submit")


def job_process(job_id: str, rank: int, mark: str) -> int | None:
    """The process of a Slurm job's task rank whose command line holds mark (the tasks run on this machine)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
            command = (proc / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        program = Path(command.split("\0")[0]).name  # python, not the srun that started it
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank) and mark in command
                and program.startswith("python")):
            return int(proc.name)
    return None


def job_pids(job_id: str) -> list[int]:
    """Every task process of a Slurm job and its training child (not srun or Slurm's own)."""
    tasks = [task_pid(job_id, rank) for rank in (0, 1)]  # first: no task may see its training die
    return [pid for pid in tasks + [training_pid(job_id, rank) for rank in (0, 1)] if pid]


def events(run_dir: Path) -> list[tuple]:
    return [(r["event"], r.get("decision")) for r in history_rows(run_dir)]


def test_a_killed_rank_and_an_abort_on_every_rank_restart_the_job_which_ends_bit_identical(overrides, uninterrupted,
                                                                                          tmp_path):
    """SIGKILL of one rank's training (a GPU off the bus, the OOM killer), then SIGABRT of every rank's (what
    NCCL's watchdog does): each time the job requeues itself and resumes; it ends as if never interrupted."""
    run_dir = tmp_path / "run"
    submit = launcher("submit.py", "--nodes", "2", *CPU_JOB, "--wait", "configs/cifar10_resnet14.yaml", *overrides,
                      "--run-dir", str(run_dir), wait=False)
    wait_until(lambda: (run_dir / "checkpoints" / "step_00000004" / "commit.json").is_file(), what="a checkpoint")
    job_id = (run_dir / "slurm" / "job_id").read_text().strip()
    pid = training_pid(job_id, 1)
    assert pid, f"no training process of task 1 of job {job_id}"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (run_dir / "checkpoints" / "step_00000012" / "commit.json").is_file(), timeout=300,
               what="a checkpoint after the restart")
    assert events(run_dir) == [("failure", "retry"), ("restart", None)]
    pids = [training_pid(job_id, rank) for rank in (0, 1)]
    assert all(pids), f"no training processes in job {job_id} after its restart: {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGABRT)
    wait_until(lambda: (run_dir / "checkpoints" / "step_00000020" / "commit.json").is_file(), timeout=300,
               what="a checkpoint after the second restart")
    # A node lost: Slurm requeues the job and every process of it is gone before any could say a word.
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    for pid in job_pids(job_id):
        os.kill(pid, signal.SIGKILL)
    output, _ = submit.communicate(timeout=400)
    assert submit.returncode == 0, output[-4000:]
    assert events(run_dir) == [("failure", "retry"), ("restart", None)] * 3
    killed, restarted, aborted, restarted_again, lost, _ = history_rows(run_dir)
    assert lost["cause"] == restart.UNASKED_REQUEUE and lost["slurm_run"] == 3 and lost["exit"] is None
    assert killed["job"] == job_id and killed["exit"] == 137 and killed["cause"] == "rank 1: killed by SIGKILL"
    assert aborted["exit"] == 134 and aborted["attempt"] == 2
    assert aborted["cause"] in ("rank 0: killed by SIGABRT", "rank 1: killed by SIGABRT")  # the first to decide
    assert restarted["checkpoint"] == str(run_dir / "checkpoints" / f"step_{restarted['step']:08d}")
    assert restarted["steps_lost"] == killed["step"] - restarted["step"] >= 0
    assert restarted_again["step"] >= 12
    assert f"attempt 1 failed at step {killed['step']}" in (run_dir / "logs" / "rank0.log").read_text()
    task_log = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    assert (f"restart 1 of at most 3 after attempt 1 failed at step {killed['step']}: resuming from checkpoint "
            f"{restarted['checkpoint']} (step {restarted['step']})") in task_log
    assert "restart 2 of at most 3 after attempt 2 failed" in task_log
    assert json.loads((run_dir / "summary.json").read_text())["fingerprint"] == uninterrupted


def in_the_way(run_dir: Path) -> None:
    """A file where the save of step 8 puts its temporary folder: every attempt fails there the same way."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / ".tmp-step_00000008").write_text("in the way\n")


def test_the_same_failure_at_the_same_step_is_retried_once_then_stopped(overrides, tmp_path):
    run_dir = tmp_path / "run"
    in_the_way(run_dir)
    out = launcher("submit.py", *CPU_JOB, "--wait", "configs/cifar10_resnet14.yaml", *overrides, "train.log_every=2",
                   "--run-dir", str(run_dir))
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert events(run_dir) == [("failure", "retry"), ("restart", None), ("failure", "stop")]
    first, restarted, second = history_rows(run_dir)
    assert first["step"] == second["step"] == 8 and restarted["step"] == 4 and restarted["steps_lost"] == 4
    said = "it failed at step 8 with the same error as attempt 1: a restart would fail the same way"
    assert second["why"] == said and f"not retried: {said}" in (run_dir / "logs" / "rank0.log").read_text()
    assert "FileExistsError" in out.stderr  # the job's own error, from its log


def test_the_sbatch_loop_follows_the_rules_and_max_failures_0_turns_retrying_off(overrides, tmp_path):
    runs = tmp_path / "runs"
    args = [str(REPO / "configs" / "cifar10_resnet14.yaml"), *overrides, "train.log_every=2", f"runs_root={runs}"]
    run_dir = Path(subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "run-dir", *args], cwd=REPO,
                                  capture_output=True, text=True, check=True).stdout.strip())
    in_the_way(run_dir)
    env = {**os.environ, "BNONLY": str(Path(sys.executable).parent / "bnonly"), "MAX_FAILURES": "0"}
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time",
         "15", "--output", str(tmp_path / "slurm-%j.out"), str(REPO / "slurm" / "train.sbatch"), *args],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout.strip()
    wait_until(lambda: squeue(job_id) == "", timeout=300, what=f"job {job_id} to end")
    out = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "attempt 1 failed at step 8 (rank 0: CheckpointError: saving checkpoint" in out, out[-3000:]
    assert "not retried: retrying is off (--max-failures 0)" in out
    assert events(run_dir) == [("failure", "stop")] and history_rows(run_dir)[0]["series"] == job_id


def test_a_failed_slurm_job_prints_the_task_error(overrides, tmp_path):
    """A data path the submitting machine does not see is submitted; the nodes' DataError comes back."""
    out = launcher("submit.py", *CPU_JOB, "--wait", "configs/cifar10_resnet14.yaml", *overrides,
                   "data.root=/nonexistent/cifar", "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "data.root=/nonexistent/cifar is not visible on this machine: not checked here" in out.stdout
    job_id = (tmp_path / "run" / "slurm" / "job_id").read_text().strip()
    assert f"job {job_id} failed; the end of task 0's error log" in out.stderr
    assert "DataError: no CIFAR-10 at /nonexistent/cifar" in out.stderr
    rows = history_rows(tmp_path / "run")  # a data error is never retried
    assert len(rows) == 1 and rows[0]["decision"] == "stop" and rows[0]["why"].startswith("never retried: a config")
