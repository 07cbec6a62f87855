"""Ctrl-C through launchers/submit.py without Slurm (submitit's local executor): as with `bnonly train`.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group: the launcher, the
job's controller and its tasks. The launcher runs here in a session of its own and the
test sends SIGINT to that group, as the terminal would.
"""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import committed_steps

REPO = Path(__file__).resolve().parents[1]
CIFAR = "configs/cifar10_resnet14.yaml"


def _env(tmp_path) -> dict:
    """No sbatch on the PATH, no cluster file: the job runs on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}", "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", "BNONLY_CLUSTER_FILE": str(tmp_path / "no-cluster.yaml")}


def _submit(tmp_path, *args, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    # Ctrl-C as at a terminal's foreground: SIGINT not ignored, even when the suite itself runs in the
    # background (which starts its children with SIGINT ignored, and Python then raises no KeyboardInterrupt).
    return subprocess.Popen([sys.executable, str(REPO / "launchers" / "submit.py"), *map(str, args)], cwd=REPO,
                            env=_env(tmp_path), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc, condition, what: str, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None, f"ended before {what}: " + proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {what} after {limit_s} s"
        time.sleep(0.05)


def _metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_ctrl_c_through_the_local_launcher_saves_and_the_rerun_resumes(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    command = ["--local", "--nodes", 1, "--tasks-per-node", 2, "--gpus-per-node", 0, CIFAR, f"data.root={cifar_root}",
               "data.batch_size=32", "train.bn_batch=32", "data.eval_batch_size=50", "optim.epochs=30",
               "train.device=cpu", "train.deterministic=true", "train.progress=lines", "train.log_every=1",
               "train.checkpoint_every=1000", "train.stop_check_every=1", "--run-dir", run_dir]
    proc = _submit(tmp_path, *command)
    _wait_for(proc, lambda: _metric_rows(run_dir) >= 2, "training")
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "Traceback" not in err, out[-2000:] + err[-3000:]
    assert err.strip().splitlines() == [
        "submit: Ctrl-C: every task stops after the same step with a checkpoint (Ctrl-C again to abort)"], err
    stopped = committed_steps(run_dir)
    assert len(stopped) == 1 and not (run_dir / "summary.json").exists()
    assert f"stopped at step {stopped[0]} with checkpoint" in out and "run the same command to resume" in out
    for rank in (0, 1):  # every rank stopped after the same step, by the terminal's SIGINT or the launcher's SIGTERM
        # (the copy it sends the tasks: whichever a rank takes first names the stop; run/stop.py keeps one stop)
        assert re.search(rf"stopped at step {stopped[0]} by SIG(INT|TERM);", (run_dir / "logs" / f"rank{rank}.log").read_text())

    # The same command again resumes from that checkpoint; a second Ctrl-C then aborts, in one line. The ranks agree
    # on a stop only every 10000 steps here, so the first Ctrl-C cannot end the run before the second comes.
    proc = _submit(tmp_path, *command, "train.stop_check_every=10000")
    log = run_dir / "logs" / "rank0.log"
    _wait_for(proc, lambda: f"at step {stopped[0]}" in log.read_text() and _metric_rows(run_dir) >= stopped[0] + 2,
              "the resume")
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped[0]:08d}'} at step {stopped[0]}" in log.read_text()
    taken = [_received(run_dir, rank, "SIGINT") for rank in (0, 1)]  # phase one's are in the logs too
    os.killpg(proc.pid, signal.SIGINT)
    _wait_for(proc, lambda: all(_received(run_dir, rank, "SIGINT") > taken[rank] for rank in (0, 1)),
              "the first Ctrl-C taken")
    time.sleep(1.5)  # a second keypress, not the same one forwarded (run/stop.py: DUPLICATE_S)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "submit: Ctrl-C: every task stops after the same step with a checkpoint (Ctrl-C again to abort)",
        "submit: interrupted; run the same command to resume from the last checkpoint"], err[-3000:]

    # Ctrl-C sent to the launcher alone (kill -INT PID) reaches the tasks: they stop with a checkpoint, a clean stop.
    proc = _submit(tmp_path, *command)
    rows = _metric_rows(run_dir)
    _wait_for(proc, lambda: _metric_rows(run_dir) >= rows + 2, "the second resume")
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and err.strip().splitlines() == [
        "submit: Ctrl-C: every task stops after the same step with a checkpoint (Ctrl-C again to abort)"], err[-3000:]
    step = committed_steps(run_dir)[-1]
    assert step > stopped[0] and f"stopped at step {step} with checkpoint" in out and "Traceback" not in err, out
    assert not (run_dir / "summary.json").exists()
    for rank in (0, 1):
        assert f"stopped at step {step} by SIGTERM" in (run_dir / "logs" / f"rank{rank}.log").read_text()


def _received(run_dir: Path, rank: int, name: str) -> int:
    """How often rank's log says it took signal name as a stop."""
    log = run_dir / "logs" / f"rank{rank}.log"
    return log.read_text().count(f"received {name}: stopping") if log.is_file() else 0


def test_ctrl_c_at_the_question_is_one_line(cifar_root, tmp_path):
    master, terminal = pty.openpty()
    try:
        proc = _submit(tmp_path, "--nodes", 2, "--tasks-per-node", 2, "--gpus-per-node", 0, CIFAR,
                       f"data.root={cifar_root}", "train.device=cpu", f"runs_root={tmp_path / 'runs'}", stdin=terminal)
        seen = ""
        while "[y/N]" not in seen:
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready and proc.poll() is None, seen + proc.communicate()[1]
            seen += os.read(proc.stdout.fileno(), 4096).decode()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(terminal)
        os.close(master)
    assert proc.returncode == 130 and err.strip() == "submit: interrupted; nothing was submitted", err
    assert not (tmp_path / "runs").exists()
