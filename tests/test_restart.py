"""The restart rules (launch/restart.py) and the history they write; the launchers' numbers.

The real restarts (a rank killed on the local Slurm, the sbatch loop) are in test_slurm.py;
a rank killed mid-save in a 2-process job is at the end of this file.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import Launch, committed_steps, history_rows, run

from bnonly_dist.config import ConfigError
from bnonly_dist.data.layout import DamagedData, DataError
from bnonly_dist.launch import restart, supervise
from bnonly_dist.run import history
from bnonly_dist.run.checkpoint import CheckpointError, CheckpointIncompatible
from bnonly_dist.run.rundir import RunDirInUse
from bnonly_dist.run.train import Diverged

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("err, code", [
    (ConfigError("x"), 2), (DataError("x"), 2), (RunDirInUse("x"), 2), (CheckpointIncompatible("x"), 2),
    (DamagedData("x"), 4), (Diverged("x"), 3), (KeyboardInterrupt(), 130),
    (RuntimeError("[gloo] Connection closed by peer"), 1), (OSError(28, "No space left on device"), 1),
    (CheckpointError("saving checkpoint failed"), 1),
])
def test_exit_codes_say_whether_a_restart_can_cure(err, code):
    assert history.exit_code(history.kind_of(err)) == code
    assert (code in history.NEVER_RETRIED) == (code != 1)


def test_a_damaged_data_file_exits_4_and_a_missing_data_set_2(tmp_path, imagenet_root):
    import shutil
    root = tmp_path / "in"
    shutil.copytree(imagenet_root, root)
    victim = sorted((root / "train").rglob("*.JPEG"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated mid-scan
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    damaged = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "data", "check", str(root), "--decode"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert damaged.returncode == 4 and "1 corrupt image(s)" in damaged.stderr, damaged.stderr
    missing = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "data", "check", str(tmp_path / "none")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr


def reach(run_dir: Path, step: int) -> None:
    """The run logged up to step (what history.step_reached reads)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0}) + "\n")


def fail(run_dir, series="7", code=1, cause="rank 0: lost contact (peer 10.0.0.3:29500)", max_failures=3,
         kind=None, requeue=False):
    """Decide and record a failure of series as the deciders do; the row in its JSON form."""
    outcome = restart.Outcome(series, history.step_reached(run_dir), kind or history.kind_of_exit(code), cause,
                              code, max_failures)
    with history.locked(run_dir):
        return history.to_json(restart.record(run_dir, outcome, series, requeue=requeue))


def test_retries_are_bounded_per_series_and_recorded(tmp_path):
    for step in (5, 9, 13):
        reach(tmp_path, step)
        assert fail(tmp_path)["decision"] == "retry"
    reach(tmp_path, 17)
    last = fail(tmp_path)
    assert last["decision"] == "stop" and "all 3 restarts of --max-failures 3 are used" in last["why"]
    reach(tmp_path, 21)
    assert fail(tmp_path, series="8")["decision"] == "retry"  # a new submission has its own budget
    rows = history_rows(tmp_path)
    assert [r["attempt"] for r in rows] == [1, 2, 3, 4, 1] and [r["step"] for r in rows] == [5, 9, 13, 17, 21]
    assert all({"time", "step", "cause", "decision"} <= set(r) for r in rows)


def test_the_same_error_at_the_same_step_is_not_retried(tmp_path):
    reach(tmp_path, 8)
    assert fail(tmp_path, cause="rank 1: CheckpointError: saving step_00000008 failed")["decision"] == "retry"
    again = fail(tmp_path, cause="rank 1: CheckpointError: saving step_00000008 failed")
    assert again["decision"] == "stop" and "failed at step 8 with the same error as attempt 1" in again["why"]
    # another error at that step, or the same one later, is retried
    reach(tmp_path, 8)
    assert fail(tmp_path, series="9", cause="rank 0: OSError: Input/output error")["decision"] == "retry"
    reach(tmp_path, 12)
    assert fail(tmp_path, series="9", cause="rank 0: OSError: Input/output error")["decision"] == "retry"


@pytest.mark.parametrize("code", sorted(history.NEVER_RETRIED))
def test_never_retried_codes_and_max_failures_zero(tmp_path, code):
    row = fail(tmp_path, code=code, cause="rank 0: x")
    assert row["decision"] == "stop" and row["why"].startswith("never retried") and f"(exit {code})" in row["why"]
    off = fail(tmp_path / "off", max_failures=0)
    assert off["decision"] == "stop" and off["why"] == "retrying is off (--max-failures 0)"


def test_the_cause_is_the_task_that_failed_not_the_peers_that_lost_it():
    lost, device = history.Kind.LOST_PEER, history.Kind.DEVICE
    notes = [history.Note(0, 1, lost, "lost contact with the other ranks (gloo: closed)"),
             history.Note(1, 1, device, "RuntimeError: CUDA error: an illegal memory access"),
             history.Note(2, 1, lost, "lost contact with the other ranks (gloo: closed)")]
    assert restart.pick_cause(notes, 137) == (1, device, "rank 1: RuntimeError: CUDA error: an illegal memory access")
    diverged = history.Note(3, 3, history.Kind.DIVERGED, "Diverged: nan")
    assert restart.pick_cause([*notes, diverged], 1)[0] == 3
    assert restart.pick_cause(notes[:1], 2)[0] == 2  # srun's never-retried code wins over a lost peer
    code, kind, cause = restart.pick_cause([], 137)
    assert code == 137 and kind is history.Kind.SIGNAL and "exit 137 (killed by SIGKILL)" in cause


def test_the_step_reached_is_where_the_failing_ranks_were_not_the_last_logged_one(tmp_path):
    reach(tmp_path, 100)  # logged every 100 steps; rows of an earlier attempt may lie beyond the checkpoint too
    history.note_failure(tmp_path, 0, 1, history.Kind.LOST_PEER, "lost contact with the other ranks (gloo: closed)",
                         step=137)
    history.note_failure(tmp_path, 1, 137, history.Kind.SIGNAL, "killed by SIGKILL")  # its task wrote it: no step known
    outcome = restart.from_notes(tmp_path, "7", 137, 0.0, 3)
    assert outcome.step == 137 and outcome.cause == "rank 1: killed by SIGKILL"
    assert restart.from_notes(tmp_path, "8", 137, 9e9, 3).step == 100  # no note of this attempt


def test_a_task_notes_what_killed_its_training_and_tells_a_stop_from_a_failure(tmp_path):
    (tmp_path / "logs").mkdir(parents=True)
    aborted = supervise.Ended(128 + signal.SIGABRT)
    assert supervise.own_note(tmp_path, 1, 0.0, aborted).line == "killed by SIGABRT"  # no note of its own: written
    (note,) = history.failures_since(tmp_path, 0.0)
    assert (note.rank, note.exit, note.kind, note.line) == (1, 134, history.Kind.SIGNAL, "killed by SIGABRT")
    assert note.unix_time == pytest.approx(time.time(), abs=60)
    history.note_failure(tmp_path, 0, 1, history.Kind.DEVICE, "RuntimeError: CUDA error: an illegal memory access")
    assert supervise.own_note(tmp_path, 0, 0.0, supervise.Ended(1)).line == "RuntimeError: CUDA error: an illegal memory access"
    assert not aborted.stopped and supervise.Ended(0, [signal.SIGUSR2]).stopped
    assert supervise.Ended(128 + signal.SIGUSR2, [signal.SIGUSR2]).stopped  # before the child's handler was in
    assert not supervise.Ended(128 + signal.SIGKILL, [signal.SIGTERM]).stopped
    stopped = supervise.result(tmp_path)
    assert stopped == {"run_dir": str(tmp_path), "step": 0, "finished": False, "stopped": True, "checkpoint": None}


def slurm_run(monkeypatch, count: int) -> None:
    """This process is run count of a requeued Slurm job (what history rows and account_for_requeue read)."""
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(count))


def test_a_requeue_no_row_asked_for_is_a_failure_recorded_once_and_counted(tmp_path, monkeypatch, capsys):
    reach(tmp_path, 6)
    (tmp_path / "logs").mkdir()
    slurm_run(monkeypatch, 0)
    restart.record_stop(tmp_path, "7", "7", 4, "SIGUSR2: stopped with a checkpoint")  # a time limit: asked for
    slurm_run(monkeypatch, 1)
    assert restart.account_for_requeue(tmp_path, "7", "7", 1, 1, rank=0) and len(history_rows(tmp_path)) == 1
    # run 1 vanishes without a word (a node failed): run 2 records it once, whichever task comes first
    reach(tmp_path, 9)
    slurm_run(monkeypatch, 2)
    assert restart.account_for_requeue(tmp_path, "7", "7", 2, 1, rank=1)
    assert restart.account_for_requeue(tmp_path, "7", "7", 2, 1, rank=0)
    stop, lost = history_rows(tmp_path)
    assert stop["event"] == "stop" and stop["requeue"] and stop["slurm_run"] == 0
    assert lost["cause"] == restart.UNASKED_REQUEUE and lost["decision"] == "retry" and lost["exit"] is None
    assert lost["step"] == 9 and lost["slurm_run"] == 2 and lost["attempt"] == 1
    assert restart.restart_pending(tmp_path, "7")  # rank 0 then says what it resumes from
    # the same step and cause again is no reason to stop (two node failures say nothing about a third)
    again = fail(tmp_path, "9", None, restart.UNASKED_REQUEUE, kind=history.Kind.NODE_LOST)
    assert again["decision"] == "retry" and again["step"] == lost["step"]
    rows = history_rows(tmp_path)
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    # again, with --max-failures 1 used up: every task is told to stop
    reach(tmp_path, 12)
    slurm_run(monkeypatch, 3)
    assert not restart.account_for_requeue(tmp_path, "7", "7", 3, 1, rank=0)
    assert not restart.account_for_requeue(tmp_path, "7", "7", 3, 1, rank=1)
    last = history_rows(tmp_path)[-1]
    assert len(history_rows(tmp_path)) == 3 and last["decision"] == "stop" and "are used" in last["why"]
    assert "not retried: all 1 restarts" in (tmp_path / "logs" / "rank0.log").read_text()
    assert capsys.readouterr().err.count("requeued by Slurm, not by a task") == 2  # said once per decision
    # a preemption: the run saved on a stop signal, trained nothing after it, and Slurm requeued it
    saved = tmp_path / "checkpoints" / "step_00000012"
    saved.mkdir(parents=True)
    (saved / "commit.json").write_text("{}")  # complete (not verified here)
    history.note_stop(tmp_path, 12, "SIGTERM")  # what the loop leaves after its stop
    slurm_run(monkeypatch, 4)
    assert restart.account_for_requeue(tmp_path, "7", "7", 4, 1, rank=0)
    assert restart.account_for_requeue(tmp_path, "7", "7", 4, 1, rank=1)
    preempted = history_rows(tmp_path)[-1]
    assert len(history_rows(tmp_path)) == 4 and preempted["event"] == "stop" and preempted["unasked"]
    assert preempted["step"] == 12 and "after a stop with a checkpoint" in preempted["why"]
    # the note explains only the requeue right after the stop: a node lost in the next run's start-up is a failure
    history.note_stop(tmp_path, 12, "SIGTERM")
    restart.record_stop(tmp_path, "7", "7", 12, "SIGUSR2: requeued")  # run 4 asked for run 5
    slurm_run(monkeypatch, 5)
    assert restart.account_for_requeue(tmp_path, "7", "7", 5, 3, rank=0) and not (tmp_path / "logs" / "stopped.json").exists()
    slurm_run(monkeypatch, 6)
    assert restart.account_for_requeue(tmp_path, "7", "7", 6, 3, rank=0) is True
    assert history_rows(tmp_path)[-1]["cause"] == restart.UNASKED_REQUEUE
    # a retry by requeue, as submitit's tasks make it, explains the next run
    reach(tmp_path, 20)
    slurm_run(monkeypatch, 0)
    fail(tmp_path, "8", 1, "rank 0: killed by SIGKILL", requeue=True)
    before = len(history_rows(tmp_path))
    slurm_run(monkeypatch, 1)
    assert restart.account_for_requeue(tmp_path, "8", "8", 1, 3, rank=0) is True
    assert history_rows(tmp_path)[-1]["series"] == "8" and len(history_rows(tmp_path)) == before


def retry_cli(run_dir, *args, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "retry", str(run_dir), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_bnonly_retry_answers_scripts_by_exit_status(tmp_path):
    run_dir = tmp_path / "run"
    reach(run_dir, 6)
    history.note_failure(run_dir, 1, 1, history.Kind.DEVICE, "RuntimeError: NCCL error: unhandled system error")
    yes = retry_cli(run_dir, "--exit-code", 137, "--series", "42", "--since", 0)
    assert yes.returncode == 0, yes.stderr
    assert ("attempt 1 failed at step 6 (rank 1: RuntimeError: NCCL error: unhandled system error); retrying from "
            "the newest complete checkpoint (restart 1 of at most 3)") in yes.stdout
    assert "resuming from scratch (no complete checkpoint); 6 steps lost" in yes.stdout
    no = retry_cli(run_dir, "--exit-code", 2, "--series", "42", "--since", 9e9)  # the old note is not this attempt's
    assert no.returncode == 1 and "not retried: never retried: a config, command-line" in no.stdout, no.stdout
    events = [(r["event"], r.get("decision")) for r in history_rows(run_dir)]
    assert events == [("failure", "retry"), ("restart", None), ("failure", "stop")]


def test_the_sbatch_scripts_record_their_stops_and_the_requeues_they_did_not_ask_for(tmp_path):
    run_dir = tmp_path / "run"
    reach(run_dir, 6)
    slurm = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0"}
    assert retry_cli(run_dir, "--requeued", 0, "--series", "42", env=slurm).returncode == 0
    assert history_rows(run_dir) == []  # a first run has nothing to account for
    stopped = retry_cli(run_dir, "--stopped", "--series", "42", env=slurm)
    assert stopped.returncode == 0 and history_rows(run_dir)[0]["event"] == "stop", stopped.stderr
    assert retry_cli(run_dir, "--requeued", 1, "--series", "42", env={**slurm, "SLURM_RESTART_COUNT": "1"}).returncode == 0
    assert len(history_rows(run_dir)) == 1  # the stop asked for that requeue
    lost = retry_cli(run_dir, "--requeued", 2, "--series", "42", env={**slurm, "SLURM_RESTART_COUNT": "2"})
    assert lost.returncode == 0 and "requeued by Slurm, not by a task of the job" in lost.stderr, lost.stderr
    assert "resuming from scratch (no complete checkpoint); 6 steps lost" in lost.stdout
    assert [(r["event"], r.get("decision")) for r in history_rows(run_dir)] == [
        ("stop", None), ("failure", "retry"), ("restart", None)]
    both = retry_cli(run_dir, "--stopped", "--exit-code", 1, "--series", "42")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def launcher_main(script: str):
    """A launcher's main(), loaded from launchers/ (not a package)."""
    spec = importlib.util.spec_from_file_location(f"launcher_{script[:-3]}", REPO / "launchers" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("script, flags, message", [
    ("submit.py", ["--nodes", "0"], "--nodes 0: must be a whole number of at least 1"),
    ("submit.py", ["--nodes", "-1"], "--nodes -1: must be a whole number of at least 1"),
    ("submit.py", ["--cpus-per-task", "0"], "--cpus-per-task 0: must be a whole number of at least 1"),
    ("submit.py", ["--gpus-per-node", "-2"], "--gpus-per-node -2: must be a whole number of at least 0"),
    ("submit.py", ["--max-failures", "-1"], "--max-failures -1: must be a whole number of at least 0"),
    ("submit.py", ["--time", "0"], "--time 0: a job needs at least one minute"),
    ("sweep.py", ["--nodes", "0"], "--nodes 0: must be a whole number of at least 1"),
    ("sweep.py", ["--tasks-per-node", "0"], "--tasks-per-node 0: must be a whole number of at least 1"),
])
def test_launcher_numbers_are_checked_before_anything_else(tmp_path, monkeypatch, capsys, script, flags, message):
    """Even before the config: a missing config file is not what the line says."""
    monkeypatch.setenv("BNONLY_CLUSTER_FILE", str(tmp_path / "none.yaml"))
    monkeypatch.chdir(tmp_path)
    code = launcher_main(script)(["--dry-run", *flags, str(tmp_path / "missing.yaml")])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and err.count("\n") == 1, out + err
    assert "#SBATCH" not in out and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_without_slurm_the_launcher_restarts_the_job_and_stops_at_the_same_failure(cifar_root, tmp_path):
    """A file where step 8's save goes: attempt 1 fails there, the launcher resubmits, attempt 2 fails the same way."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / ".tmp-step_00000008").write_text("in the way\n")
    bin_dir = tmp_path / "bin"  # a PATH without sbatch
    bin_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}:{Path(sys.executable).parent}",
           "BNONLY_CLUSTER_FILE": str(tmp_path / "none.yaml"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), "configs/cifar10_resnet14.yaml",
                          f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "optim.epochs=1",
                          "model.arch=cifar_resnet_8", "train.device=cpu", "train.log_every=2", "train.checkpoint_every=4",
                          "train.progress=lines",
                          "--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and "job failed, restarting as job" in out.stdout, out.stdout + out.stderr
    assert [(r["event"], r.get("decision")) for r in history_rows(run_dir)] == [
        ("failure", "retry"), ("restart", None), ("failure", "stop")]
    assert history_rows(run_dir)[0]["series"].startswith("local-")
    assert "FileExistsError" in out.stderr


# --- a rank killed in the middle of a checkpoint save, 2 processes ----------------------------------------
def saves_under_way(folder: Path) -> list[int]:
    """Steps whose save has begun and not been committed (.tmp-step_X; not retention's .tmp-step_X.old)."""
    names = [p.name for p in folder.glob(".tmp-step_*")] if folder.is_dir() else []
    return sorted(int(n[10:]) for n in names if n[10:].isdigit())


@pytest.mark.slow
def test_a_rank_killed_mid_save_resumes_from_the_previous_checkpoint_bit_for_bit(cifar_root, tmp_path):
    overrides = [f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "data.eval_batch_size=50",
                 "optim.epochs=1", "optim.milestones=[1]", "model.arch=cifar_resnet_8", "train.device=cpu",
                 "train.deterministic=true", "train.log_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                 "train.progress=lines", "dist.save_frozen=true"]  # a larger save: a wider window to land in
    reference = run(2, overrides, tmp_path / "whole")["fingerprint"]
    run_dir, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    launch = Launch(2, overrides, run_dir)
    launch.wait_for(lambda: committed_steps(run_dir), timeout=180, poll=0.01)  # a first complete checkpoint
    first = committed_steps(run_dir)[-1]
    # the next save under way: its temporary folder exists, its commit marker does not (yet)
    launch.wait_for(lambda: [s for s in saves_under_way(folder) if s > first], timeout=120, poll=0.0005)
    launch.kill(rank=1)
    codes = launch.wait(timeout=180)
    cut = saves_under_way(folder)
    assert codes[1] == -9 and codes[0] == 1 and cut and cut[-1] not in committed_steps(run_dir), (codes, cut)
    previous = committed_steps(run_dir)[-1]
    assert previous < cut[-1]
    again = Launch(2, overrides, run_dir, tag="-retry")
    assert again.wait(timeout=300) == [0, 0], again.output(0)[-3000:]
    assert f"resumed from {folder / f'step_{previous:08d}'} at step {previous}" in again.output(0)
    assert json.loads((run_dir / "summary.json").read_text())["fingerprint"] == reference
    assert not list(folder.glob(".tmp-*"))
