"""Faults of the process that must not cost a run: Ctrl-C once and twice, SIGKILL at random moments.

Each runs the real CLI as a subprocess (helpers from test_faults.py).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import committed_steps
from test_faults import CONFIG, REPO, base_overrides, cli

from bnonly_dist.run import checkpoint, checkpoint_files


def test_ctrl_c_stops_with_a_checkpoint_and_twice_aborts(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "bnonly_dist.cli", "train", CONFIG, *base_overrides(cifar_root), "optim.epochs=30",
            "train.checkpoint_every=1000", "train.stop_check_every=1", "train.log_every=1", "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def start(*extra):
        return subprocess.Popen([*args, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def wait_for_steps(proc, count):
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or \
                len((run_dir / "metrics.jsonl").read_text().splitlines()) < count:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)

    proc = start()
    wait_for_steps(proc, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "received SIGINT" in out and "stopped at step" in out and "run the same command to resume" in out
    stopped = committed_steps(run_dir)
    assert len(stopped) == 1 and not (run_dir / "summary.json").exists()
    # Resumed, with the ranks asked only every 1000 steps: a second Ctrl-C does not wait for that.
    proc = start("train.stop_check_every=1000")
    wait_for_steps(proc, stopped[0] + 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "bnonly: interrupted; run the same command to resume from the last checkpoint"], err[-2000:]
    assert committed_steps(run_dir) == stopped  # no save on the way out


# --- SIGKILL at random moments ------------------------------------------------------------------
def good_checkpoints(run_dir: Path) -> list[int]:
    good = []
    for path in checkpoint.complete_checkpoints(run_dir):
        try:
            checkpoint_files.verify(path)
            good.append(checkpoint_files.step_of(path))
        except checkpoint_files.CheckpointDamaged:
            pass
    return good


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_progress(cifar_root, tmp_path):
    """20 kills at random moments once training is under way (every other one inside a save),
    resuming each time: never fewer good checkpoints, and the run ends bit-identical."""
    overrides = [*base_overrides(cifar_root), "optim.epochs=10", "optim.milestones=[5]", "model.arch=cifar_resnet_8",
                 "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    whole = cli("train", CONFIG, *overrides, "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = json.loads((tmp_path / "whole" / "summary.json").read_text())["fingerprint"]
    run_dir, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    inside_saves = 0
    for seed in range(20):
        before = good_checkpoints(run_dir)
        proc = subprocess.Popen([sys.executable, "-m", "bnonly_dist.cli", "train", CONFIG, *overrides, "--run-dir",
                                 str(run_dir)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rng, deadline = random.Random(seed), time.monotonic() + 120
        # Under way: a step past the checkpoint it resumed from has been committed.
        while proc.poll() is None and not [s for s in committed_steps(run_dir) if not before or s > before[-1]]:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)
        if seed % 2:  # inside a save: its temporary folder exists
            until = time.monotonic() + 5
            while proc.poll() is None and not any(folder.glob(".tmp-step_*")) and time.monotonic() < until:
                time.sleep(0.001)
            inside_saves += any(folder.glob(".tmp-step_*"))
        else:
            time.sleep(rng.uniform(0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = good_checkpoints(run_dir)
        assert len(after) >= min(len(before), 2) and (not before or after[-1] >= before[-1]), (seed, before, after)
    assert inside_saves >= 5  # the kills did land inside saves
    done = cli("train", CONFIG, *overrides, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["fingerprint"] == reference
    assert not list(folder.glob(".tmp-*")) and good_checkpoints(run_dir)[-1] == 100
