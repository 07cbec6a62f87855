"""A 16-rank rehearsal of the headline run on the CPU: process groups, sharding and resharding at the
world size of a real multi-node job (the rest of the suite stops at 4 ranks).

The headline run is `python launchers/submit.py --nodes 8 --gpus-per-node 8
configs/imagenet_resnet200.yaml`: 64 ranks at batch 1024 and bn_batch 128, so 16 images per rank and
every BN statistic synchronised over the 8 ranks of one node, FSDP if the frozen weights must be
sharded. Here the same config file runs through the same launcher and the same code (submitit tasks,
each supervising its training; gloo groups of 8 ranks for BN; FSDP2 shards; DCP checkpoints) at 16
ranks as 2 nodes x 8 tasks of the local Slurm (slurm/local-cluster/up.sh gives each node 8 CPUs), with:

- model.arch=imagenet_resnet_18_8 (the ImageNet ResNet family at width 8: 177,362 numbers, so
  that 16 ranks fit the memory and 2 cores of this machine; its BN tensors of 8 channels leave half
  of the 16 ranks an empty FSDP shard, the most uneven sharding there is);
- generated CIFAR-10 (32 x 32 images) instead of DALI's ImageNet: CIFAR's augmentations are drawn
  per global batch, so a resume on another world size sees the same images, while DALI draws its
  crops per rank (docs/distributed.md) and the comparison below would mean nothing;
- global batch 16 (1 image per rank) and train.bn_batch=8: BN statistics synchronised over groups of
  8 ranks, one group per node, as on the headline run; dist.engine=fsdp;
- optim.lr=0.02 without warm-up, as tests/test_bn_groups.py: at the recipe's 0.4 (and already at 0.1)
  BN over 8 values amplifies the float32 rounding of synchronised sums (1e-6 at step 2) into a loss
  up to 2 % apart by step 6, on 4, 8 and 16 ranks alike, while at 0.02 they stay within 3e-6.

The job checkpoints at step 2, gets SIGUSR2 as from `scancel --signal=USR2` (Slurm's warning before
a preemption), stops with a checkpoint and is requeued; the requeued job is cancelled and the run
resubmitted on 8 ranks as 2 nodes x 4 tasks (a BN group of 8 ranks now spans both nodes), which
resumes, resharding the 16 ranks' checkpoint, and trains two more steps.

The uninterrupted reference is one process with the same bn_batch (2 ghost groups of 8): the project
promises the same experiment on any world size (tests/test_bn_groups.py checks 1, 2 and 4 ranks),
and one process costs seconds where an uninterrupted 16-rank run costs minutes. Every logged loss,
the final BN parameters and running statistics and the final evaluation must match it within
tests/test_bn_groups.py's tolerances.

Where no Slurm answers the same runs go through
torchrun with 2 node ranks of 8 (then 2 of 4) processes, the stop as SIGUSR2 to every worker;
REHEARSAL_LAUNCHER=torchrun forces that path (under CI=true a missing cluster fails, as in
tests/test_slurm.py). The test records the peak of the summed resident memory of its processes
(sampled from /proc) and keeps it under MEMORY_BUDGET_GIB; docs/benchmarks.md has its numbers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from launch import Launch, committed_steps, free_port
from test_bn_groups import LOSS_RTOL, STATE_ATOL, final_state
from test_slurm import cluster_up, squeue, wait_until

REPO = Path(__file__).resolve().parents[1]
HEADLINE = "configs/imagenet_resnet200.yaml"
MEMORY_BUDGET_GIB = 12  # half of this 24 GiB machine: room for the suite's own process beside it
STOP_AFTER = 2  # the step of the periodic checkpoint after which the stop signal comes
MORE_STEPS = 2  # steps the 8 ranks train after the resume


def overrides(cifar_root, max_steps: int) -> list[str]:
    """The headline config scaled down; lr 0.02 without warm-up, as tests/test_bn_groups.py (see the module doc)."""
    return ["data.name=cifar10", f"data.root={cifar_root}", "model.arch=imagenet_resnet_18_8", "data.batch_size=16",
            "train.bn_batch=8", "dist.engine=fsdp", "optim.lr=0.02", "optim.warmup_epochs=0", "train.device=cpu",
            "train.deterministic=true", f"train.checkpoint_every={STOP_AFTER}", "train.stop_check_every=1",
            "train.log_every=1", "train.progress=lines", f"train.max_steps={max_steps}",
            "data.eval_batch_size=112"]  # every validation image (103) in one pass on 16, 8 or 1 ranks


class Usage:
    """Samples the summed RSS (and PSS) of this test's processes, the children of the test and every
    process of its Slurm jobs (found by SLURM_JOB_ID, since slurmd starts them), and their CPU time."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.job_ids = interval_s, set()
        self.peak_rss = self.peak_pss = 0
        self._cpu: dict[int, int] = {}  # pid -> its user + system clock ticks when last seen
        self._job_of: dict[int, str | None] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def _job(self, pid: int) -> str | None:
        if pid not in self._job_of:
            try:
                env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            except OSError:
                env = []
            found = [e[len(b"SLURM_JOB_ID="):].decode() for e in env if e.startswith(b"SLURM_JOB_ID=")]
            self._job_of[pid] = found[0] if found else None
        return self._job_of[pid]

    def _sample(self) -> None:
        parents, rss, cpu = {}, {}, {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(proc.name)
            parents[pid], cpu[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
            rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        mine, me = set(), os.getpid()
        for pid in parents:
            ancestor, seen = pid, 0
            while ancestor > 1 and seen < 64:  # a descendant of the test (not the test itself)
                ancestor, seen = parents.get(ancestor, 0), seen + 1
                if ancestor == me:
                    mine.add(pid)
                    break
            if pid not in mine and self.job_ids and self._job(pid) in self.job_ids:
                mine.add(pid)
        pss = 0
        for pid in mine:
            try:
                rollup = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
                pss += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) * 1024
            except (OSError, StopIteration):
                continue
        self.peak_rss = max(self.peak_rss, sum(rss[pid] for pid in mine))
        self.peak_pss = max(self.peak_pss, pss)
        self._cpu.update({pid: cpu[pid] for pid in mine})

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values()) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            self._sample()


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.is_file() else []


class Slurm:
    """launchers/submit.py, as the headline command; a stop is Slurm's USR2 to every task."""
    name = "slurm"

    def __init__(self, usage: Usage):
        self.usage, self.jobs = usage, []

    def start(self, nodes: int, tasks: int, args: list[str], run_dir: Path) -> None:
        out = subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), "--nodes", str(nodes),
                              "--gpus-per-node", "0", "--tasks-per-node", str(tasks), "--cpus-per-task", "1",
                              "--time", "15", HEADLINE, *args, "--run-dir", str(run_dir)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        self.jobs.append((run_dir / "slurm" / "job_id").read_text().strip())
        self.usage.job_ids.add(self.jobs[-1])

    def stop(self) -> None:
        """USR2 (what Slurm sends before a preemption); the job saves and requeues itself: take it back."""
        subprocess.run(["scancel", "--signal=USR2", self.jobs[-1]], check=True)
        wait_until(lambda: squeue(self.jobs[-1]) == "PENDING", timeout=300, what="the stopped job to be requeued")
        subprocess.run(["scancel", self.jobs[-1]], check=True)

    def alive(self) -> bool:
        """False once Slurm no longer runs or holds the job; True while squeue cannot say (a busy slurmctld)."""
        out = subprocess.run(["squeue", "-h", "-j", self.jobs[-1], "-o", "%T"], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip() != ""
        return "Invalid job id" not in out.stderr  # forgotten after MinJobAge: long over

    def wait(self, timeout: float = 600) -> None:
        wait_until(lambda: not self.alive(), timeout=timeout, what=f"job {self.jobs[-1]} to end")

    def close(self) -> None:
        for job in self.jobs:  # only this test's jobs
            subprocess.run(["scancel", job], capture_output=True)


class Torchrun:
    """torchrun with one agent per node rank, all on this machine; a stop is SIGUSR2 to every worker."""
    name = "torchrun"

    def __init__(self):
        self.agents: list[subprocess.Popen] = []  # the test's children: Usage finds them and their workers

    def start(self, nodes: int, tasks: int, args: list[str], run_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
        port = free_port()
        logs = run_dir.parent / f"{run_dir.name}-torchrun"
        logs.mkdir(parents=True, exist_ok=True)
        self.agents = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node-rank={node}",
             f"--nproc-per-node={tasks}", "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "bnonly_dist.cli", "train", HEADLINE, *args, "--run-dir", str(run_dir)],
            cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=open(logs / f"node{node}.{time.monotonic_ns()}.txt", "w"),
            stderr=subprocess.STDOUT) for node in range(nodes)]

    def alive(self) -> bool:
        return all(agent.poll() is None for agent in self.agents)

    def stop(self) -> None:
        for agent in self.agents:
            for worker in workers_of(agent.pid):
                os.kill(worker, signal.SIGUSR2)
        self.wait()

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        codes = [agent.wait(timeout=max(1, deadline - time.monotonic())) for agent in self.agents]
        assert codes == [0] * len(codes), f"torchrun exit codes {codes}"

    def close(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()


def launcher_here(usage: Usage):
    if os.environ.get("REHEARSAL_LAUNCHER") == "torchrun":
        return Torchrun()
    if cluster_up():
        return Slurm(usage)
    if os.environ.get("CI") == "true":
        pytest.fail("no Slurm cluster answers: CI must run slurm/local-cluster/up.sh first")
    return Torchrun()


def losses_by_step(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.slow
def test_the_headline_run_at_16_ranks_stops_and_resumes_on_8_as_if_never_interrupted(cifar_root, tmp_path,
                                                                                   record_property):
    run_dir, reference_dir = tmp_path / "run", tmp_path / "reference"
    with Usage() as usage:
        launcher = launcher_here(usage)
        try:
            launcher.start(2, 8, overrides(cifar_root, max_steps=40), run_dir)  # 40: never reached, it stops first
            wait_until(lambda: STOP_AFTER in committed_steps(run_dir) or not launcher.alive(), timeout=600,
                       what="the first checkpoint")
            assert STOP_AFTER in committed_steps(run_dir), f"the 16 ranks ended before step {STOP_AFTER}"
            launcher.stop()
            stopped_at = committed_steps(run_dir)[-1]
            commit = json.loads((run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "commit.json").read_text())
            assert commit["world"] == 16
            end = stopped_at + MORE_STEPS
            launcher.start(2, 4, overrides(cifar_root, max_steps=end), run_dir)
            reference = Launch(1, overrides(cifar_root, max_steps=end), reference_dir, config=HEADLINE)
            assert reference.wait() == [0], reference.output(0)[-3000:]
            launcher.wait()
        finally:
            launcher.close()
    peak_rss, peak_pss = usage.peak_rss / 2**30, usage.peak_pss / 2**30
    record_property("peak_rss_gib", round(peak_rss, 2))
    record_property("peak_pss_gib", round(peak_pss, 2))
    record_property("cpu_s", round(usage.cpu_s))
    print(f"\n{launcher.name}: the test's processes: peak RSS {peak_rss:.2f} GiB, peak PSS {peak_pss:.2f} GiB, "
          f"CPU {usage.cpu_s:.0f} s")
    assert peak_rss < MEMORY_BUDGET_GIB, f"peak RSS {peak_rss:.2f} GiB"

    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "steps 0 -> 40 on cpu x16" in log and "BN statistics over 8 images: synchronised over 8 ranks" in log
    assert "received SIGUSR2" in log and f"stopped at step {stopped_at} by SIGUSR2" in log
    assert (f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in log
            and "checkpoint written by 16 ranks, resuming on 8" in log)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world"], summary["engine"], summary["step"]) == (8, "fsdp", end)
    if launcher.name == "slurm":  # 8 tasks on each node, then 4
        first, second = (run_dir / "slurm" / f"{job}_{task}_log.out" for job, task in zip(launcher.jobs, (15, 7)))
        assert "local_rank=7(8), node=1(2), global_rank=15(16)" in first.read_text()
        assert "local_rank=3(4), node=1(2), global_rank=7(8)" in second.read_text()

    resumed, uninterrupted = losses_by_step(run_dir), losses_by_step(reference_dir)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, end + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [uninterrupted[s] for s in sorted(resumed)],
                               rtol=LOSS_RTOL)
    ours, theirs = final_state(run_dir), final_state(reference_dir)
    # Frozen weights are regenerated, not saved: the state is every BN layer's weight, bias, running mean,
    # running variance and batch count, 5 x 20 for ResNet-18.
    assert ours.keys() == theirs.keys() and len(theirs) == 5 * 20
    for key in theirs:
        difference = (ours[key].double() - theirs[key].double()).abs().max().item()
        assert difference <= STATE_ATOL, f"{key}: {difference}"
    expected = json.loads((reference_dir / "summary.json").read_text())["final"]["loss"]
    assert summary["final"]["loss"] == pytest.approx(expected, rel=LOSS_RTOL)
