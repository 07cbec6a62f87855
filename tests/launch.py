"""Start a run as several local processes over gloo, as torchrun or srun would, and watch it."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bnonly_dist.rendezvous import master_port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_job_id_with_free_port() -> str:
    """A job id whose derived port is free here, so the Slurm path derives it itself."""
    for job_id in range(424242, 425242):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", master_port(str(job_id))))
                return str(job_id)
            except OSError:
                continue
    raise RuntimeError("no free port")


class Launch:
    """world processes of `bnonly train` with torchrun's variables (or Slurm's if slurm=True)."""

    def __init__(self, world: int, overrides: list[str], run_dir: Path, config: str = "configs/cifar10_resnet14.yaml",
                 slurm: bool = False, tag: str = ""):
        self.run_dir = Path(run_dir)
        logs = self.run_dir.parent / f"{self.run_dir.name}-out"
        logs.mkdir(parents=True, exist_ok=True)
        port, job_id = free_port(), slurm_job_id_with_free_port()
        self.procs, self.outputs = [], []
        for rank in range(world):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
            if slurm:
                env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                           SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="localhost")
            else:
                env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port))
            env["OMP_NUM_THREADS"] = "1"
            out = logs / f"rank{rank}{tag}.{time.monotonic_ns()}.txt"
            self.outputs.append(out)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bnonly_dist.cli", "train", config, *overrides, "--run-dir", str(run_dir)],
                env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ranks still running after {timeout} s:\n{self.output(0)[-3000:]}") from None

    def kill(self, rank: int | None = None, sig=signal.SIGKILL) -> None:
        for r, p in enumerate(self.procs):
            if (rank is None or r == rank) and p.poll() is None:
                p.send_signal(sig)

    def output(self, rank: int) -> str:
        return self.outputs[rank].read_text()

    def wait_for(self, condition, timeout: float = 120, poll: float = 0.05) -> None:
        """Poll until condition() holds; fail if a rank exits or time runs out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.kill()
                raise AssertionError(f"condition not reached:\n{self.output(0)[-3000:]}")
            time.sleep(poll)


def run(world: int, overrides: list[str], run_dir: Path, **kwargs) -> dict:
    """Run to the end; return summary.json (assert that every rank exited 0)."""
    launch = Launch(world, overrides, run_dir, **kwargs)
    codes = launch.wait()
    assert codes == [0] * world, f"exit codes {codes}:\n{launch.output(codes.index(max(codes)))[-4000:]}"
    return json.loads((Path(run_dir) / "summary.json").read_text())


def train_losses(run_dir: Path) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def committed_steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    return sorted(int(p.parent.name[5:]) for p in folder.glob("step_*/commit.json")) if folder.is_dir() else []


def run_torchrun(world: int, overrides: list[str], run_dir: Path, config: str = "configs/cifar10_resnet14.yaml") -> dict:
    """Run to the end under torchrun (the launcher users type); return summary.json."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           "-m", "bnonly_dist.cli", "train", config, *overrides, "--run-dir", str(run_dir)],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(run_dir) / "summary.json").read_text())


def history_rows(run_dir: Path) -> list[dict]:
    """RUN/history.jsonl as the ledger reads it, each row in its JSON form."""
    from bnonly_dist.run import history
    return [history.to_json(row) for row in history.read(run_dir).rows]
