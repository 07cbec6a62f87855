"""Checkpoint integrity, the run-dir lock and identity, and the stop agreement, in one process.

The Checkpointer runs here with the single-process engine on a small ResNet, so every
sequence of saves, damage and resumes is checked in seconds; test_faults.py drives the
same code through the real CLI.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bnonly_dist import config, models, modes
from bnonly_dist.engines.base import Engine
from bnonly_dist.run import checkpoint, checkpoint_files, rundir, stop
from bnonly_dist.run.checkpoint import Checkpointer, CheckpointError, CheckpointIncompatible
from bnonly_dist.run.paths import RunPaths

IDENTITY = {"optim.lr": 0.1, "seed": 0}


class Source:
    """The data-source side of a checkpoint: a position that must come back on resume."""

    def __init__(self):
        self.position = 0

    def state(self) -> dict:
        return {"position": self.position}

    def load_state(self, state: dict) -> None:
        self.position = state["position"]


def make(run_dir, keep=2, identity=IDENTITY, seed=0):
    model = models.build("cifar_resnet_8", 10, seed)
    modes.apply(model, "bn", seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    engine = Engine(model, optimizer, {}, 0.0)
    ckpt = Checkpointer(run_dir, 0, 1, engine, Source(), checkpoint.frozen_digest(model), every=1, keep=keep,
                        save_frozen=False, steps_per_epoch=10, identity=dict(identity))
    return ckpt, model


def train_to(ckpt, model, step):
    """Change the BN weights as if step optimizer steps had run, then save."""
    with torch.no_grad():
        model.bn1.weight.fill_(step)
    ckpt.source.position = step
    return ckpt.save(step)


def steps(run_dir):
    return [checkpoint_files.step_of(p) for p in checkpoint.complete_checkpoints(run_dir)]


def truncate(path):
    shard = next((path / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:50])
    return shard


def test_the_marker_lists_every_file_with_size_and_checksum(tmp_path):
    ckpt, model = make(tmp_path)
    path = train_to(ckpt, model, 1)
    marker = json.loads((path / "commit.json").read_text())
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"commit.json"}
    assert set(marker["files"]) == on_disk and "rank0.pt" in on_disk and "state/.metadata" in on_disk
    for name, entry in marker["files"].items():
        assert entry["size"] == (path / name).stat().st_size and len(entry["sha256"]) == 64
    assert marker["identity"] == IDENTITY and checkpoint_files.verify(path)["step"] == 1
    (path / "rank0.pt").write_bytes(b"x" * marker["files"]["rank0.pt"]["size"])  # same size, other bytes
    with pytest.raises(checkpoint_files.CheckpointDamaged, match="rank0.pt does not match its committed checksum"):
        checkpoint_files.verify(path)


@pytest.mark.parametrize("marker", ["{not json", "[]", '{"step": 2}', '{"step": 3, "world": 1, "engine": "single", '
                                    '"frozen_sha256": "x", "frozen_included": false}', "\xff\xfe"])
def test_a_bad_marker_is_damaged_not_a_key_error(tmp_path, marker):
    ckpt, model = make(tmp_path)
    train_to(ckpt, model, 1)
    path = train_to(ckpt, model, 2)
    (path / "commit.json").write_bytes(marker.encode("latin-1"))
    resumed = make(tmp_path)[0].resume()
    assert resumed.step == 1 and (tmp_path / "checkpoints" / "step_00000002.damaged").is_dir()


def test_damaged_newest_then_continue_keeps_a_resumable_run_dir(tmp_path, caplog):
    """The issue's sequence: damage the newest, resume, train on past it, damage again: still resumable."""
    ckpt, model = make(tmp_path, keep=2)
    for step in (1, 2):
        train_to(ckpt, model, step)
    shard = truncate(tmp_path / "checkpoints" / "step_00000002")
    ckpt, model = make(tmp_path, keep=2)
    with caplog.at_level(logging.ERROR):
        resumed = ckpt.resume()
    assert resumed.step == 1 and ckpt.source.position == 1
    assert f"{shard} is truncated (50 of" in caplog.text and "moved aside to step_00000002.damaged" in caplog.text
    assert steps(tmp_path) == [1]
    new = train_to(ckpt, model, 2)  # the damaged folder does not stand in for the new save of step 2
    assert checkpoint_files.verify(new)["step"] == 2 and steps(tmp_path) == [1, 2]
    train_to(ckpt, model, 3)
    assert steps(tmp_path) == [2, 3]  # retention counted only good ones
    truncate(tmp_path / "checkpoints" / "step_00000003")
    ckpt, model = make(tmp_path, keep=2)
    assert ckpt.resume().step == 2 and model.bn1.weight[0].item() == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000002.damaged", "step_00000003.damaged"]


def test_retention_moves_a_damaged_old_one_aside_instead_of_counting_it(tmp_path):
    ckpt, model = make(tmp_path, keep=2)
    for step in (1, 2):
        train_to(ckpt, model, step)
    truncate(tmp_path / "checkpoints" / "step_00000002")
    train_to(ckpt, model, 3)  # keep=2 would keep the damaged step 2 and delete the good step 1
    assert steps(tmp_path) == [1, 3] and (tmp_path / "checkpoints" / "step_00000002.damaged").is_dir()


def test_retention_waits_for_a_verified_new_checkpoint(tmp_path, monkeypatch):
    ckpt, model = make(tmp_path, keep=1)
    train_to(ckpt, model, 1)

    def broken(path, checksums=True):
        raise checkpoint_files.CheckpointDamaged(f"{path} is not what was written")

    monkeypatch.setattr(checkpoint, "verify", broken)
    with pytest.raises(CheckpointError, match="is not what was written"):
        train_to(ckpt, model, 2)
    assert 1 in steps(tmp_path)  # the older one stays: the new one was never verified


def test_when_every_checkpoint_is_damaged_the_run_refuses_to_start_over(tmp_path):
    ckpt, model = make(tmp_path)
    for step in (1, 2):
        train_to(ckpt, model, step)
    for path in checkpoint.complete_checkpoints(tmp_path):
        truncate(path)
    for _ in range(2):  # and again on the next attempt, with both moved aside
        with pytest.raises(CheckpointError, match="none of the 2 checkpoints .*moved aside: step_00000001.damaged"):
            make(tmp_path)[0].resume()


def test_a_checkpoint_of_another_computation_is_refused(tmp_path):
    ckpt, model = make(tmp_path)
    train_to(ckpt, model, 1)
    with pytest.raises(CheckpointIncompatible, match="optim.lr=0.1, not 0.5"):
        make(tmp_path, identity={**IDENTITY, "optim.lr": 0.5})[0].resume()
    assert steps(tmp_path) == [1]


def test_latest_good_skips_damage_without_moving_it(tmp_path):
    ckpt, model = make(tmp_path)
    for step in (1, 2):
        train_to(ckpt, model, step)
    truncate(tmp_path / "checkpoints" / "step_00000002")
    assert checkpoint.latest_good(tmp_path).name == "step_00000001" and steps(tmp_path) == [1, 2]


# --- the run directory: identity from a checkpoint, paths, the lock ------------------------------
def cfg(*overrides):
    return config.load(None, ["data.name=synthetic", *overrides])


def saved_run(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    rundir.prepare(cfg(*overrides), run_dir)
    ckpt, model = make(run_dir, identity=cfg(*overrides).identity())
    train_to(ckpt, model, 1)
    return run_dir


@pytest.mark.parametrize("damage", ["delete", "garbage", "latin-1"])
def test_without_a_readable_config_yaml_the_checkpoint_names_the_run(tmp_path, damage):
    run_dir = saved_run(tmp_path, "optim.lr=0.2")
    config_yaml = RunPaths(run_dir).config
    if damage == "delete":
        config_yaml.unlink()
    else:
        config_yaml.write_bytes(b"optim: [unclosed" if damage == "garbage" else "optim:\n  lr: 0.2 \xe9\n".encode("latin-1"))
    with pytest.raises(config.ConfigError, match=r"optim.lr=0.2, not 0.5 \(from .*step_00000001/commit.json\)"):
        rundir.check(cfg("optim.lr=0.5"), run_dir)
    rundir.check(cfg("optim.lr=0.2"), run_dir)  # the same run resumes


def test_a_corrupt_config_yaml_without_checkpoints_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunPaths(run_dir).config.write_text("optim: [unclosed")
    with pytest.raises(rundir.RunDirError, match="config.yaml is unreadable .*restore it, or delete it"):
        rundir.check(cfg(), run_dir)


@pytest.mark.parametrize("layout, message", [
    ("run_is_file", "is a file, not a directory"), ("parent_is_file", "is a file; pass another --run-dir"),
    ("checkpoints_is_file", "checkpoints is a file where the run keeps a folder")])
def test_run_dir_paths_are_checked_before_anything_is_created(tmp_path, layout, message):
    run_dir = tmp_path / "run"
    if layout == "run_is_file":
        run_dir.write_text("x")
    elif layout == "parent_is_file":
        (tmp_path / "runs").write_text("x")
        run_dir = tmp_path / "runs" / "a" / "run"
    else:
        run_dir.mkdir()
        (run_dir / "checkpoints").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(rundir.RunDirError, match=message):
        rundir.prepare(cfg(), run_dir)
    assert sorted(tmp_path.rglob("*")) == before


def test_one_trainer_per_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    lock = rundir.create(cfg(), run_dir, rundir.claim(cfg(), run_dir))
    config_before = RunPaths(run_dir).config.read_bytes()
    with pytest.raises(rundir.RunDirInUse, match=f"in use by another trainer \\(pid {os.getpid()} on host "):
        rundir.claim(cfg("train.max_steps=3"), run_dir)
    assert RunPaths(run_dir).config.read_bytes() == config_before  # the refused one wrote nothing
    lock.release()
    rundir.create(cfg(), run_dir, rundir.claim(cfg(), run_dir)).release()


@pytest.mark.parametrize("exists", [False, True])
def test_a_start_checks_its_run_dir_once_under_the_lock(tmp_path, monkeypatch, exists):
    run_dir = tmp_path / "run"
    if exists:
        rundir.prepare(cfg(), run_dir)
    checked = []
    real = rundir._check_identity

    def spy(config, root):
        with pytest.raises(rundir.RunDirInUse):  # the lock is held while the identity is read
            rundir.acquire(root)
        checked.append(root)
        real(config, root)

    monkeypatch.setattr(rundir, "_check_identity", spy)
    rundir.prepare(cfg(), run_dir)
    assert checked == [run_dir]


def test_a_sweep_refuses_before_creating_any_run_dir(tmp_path):
    taken = tmp_path / "b"
    rundir.prepare(cfg("optim.lr=0.5"), taken)
    with pytest.raises(config.ConfigError, match="holds a run with optim.lr=0.5"):
        rundir.prepare_all([(cfg(), tmp_path / "a"), (cfg(), taken)])
    assert not (tmp_path / "a").exists()
    rundir.acquire(taken).release()  # no lock left behind


def test_a_killed_trainer_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bnonly_dist.run import rundir; "
                               f"rundir.acquire({str(run_dir)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirInUse, match=f"pid {holder.pid} "):
            rundir.acquire(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.acquire(run_dir).release()


# --- stop agreement ---------------------------------------------------------------------------
def test_stop_is_agreed_only_every_n_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(stop.dist, "any_rank", lambda flag: calls.append(flag) or flag)
    request = stop.StopRequest(every=10)
    try:
        assert not any(request.agreed(s) for s in range(1, 20)) and calls == [False]  # only step 10 asked
        os.kill(os.getpid(), signal.SIGUSR2)
        assert [request.agreed(s) for s in (21, 29, 30)] == [False, False, True]  # all ranks: the same step 30
    finally:
        request.close()


def test_a_stop_signal_delivered_twice_at_once_is_said_once(caplog):
    """Slurm signals every process of a step, and the submitit task passes the same signal on to its training."""
    request = stop.StopRequest(every=1)
    try:
        with caplog.at_level(logging.WARNING):
            os.kill(os.getpid(), signal.SIGUSR2)
            os.kill(os.getpid(), signal.SIGUSR2)
        assert request.signal_name == "SIGUSR2"
        assert [r.getMessage() for r in caplog.records].count(
            "received SIGUSR2: stopping within 1 steps with a checkpoint") == 1
    finally:
        request.close()


def test_a_stop_signal_during_start_up_is_kept_for_the_loop(caplog):
    """bnonly train keeps SIGUSR2/SIGTERM from its first line until the loop's StopRequest takes them over."""
    from bnonly_dist.run import early_signals
    before = signal.getsignal(signal.SIGTERM)
    with early_signals.kept():
        os.kill(os.getpid(), signal.SIGTERM)  # the default would end this process
        request = stop.StopRequest(every=1)
        try:
            assert request.signal_name == "SIGTERM"
            assert "received SIGTERM: stopping within 1 steps" in caplog.text
        finally:
            request.close()
    assert signal.getsignal(signal.SIGTERM) == before and early_signals.take() == []


@pytest.mark.parametrize("then, dies", [("taken", True), ("again later", True), ("again at once", False)])
def test_a_kept_signal_ends_the_process_once_the_loop_is_over_or_when_it_comes_again_later(then, dies):
    script = f"""
import os, signal, sys, time
from bnonly_dist.run import early_signals
with early_signals.kept():
    os.kill(os.getpid(), signal.SIGTERM)
    if {then!r} == "taken":
        early_signals.take()
    if {then!r} == "again later":
        time.sleep(early_signals.REPEAT_S + 0.1)
    os.kill(os.getpid(), signal.SIGTERM)
    print("alive", early_signals.take(), flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    if dies:
        assert out.returncode == -signal.SIGTERM and "alive" not in out.stdout, out.stdout + out.stderr
    else:
        assert out.returncode == 0 and "alive [15, 15]" in out.stdout, out.stderr


def test_ctrl_c_stops_gracefully_then_aborts(monkeypatch):
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    request = stop.StopRequest(every=1)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signal_name == "SIGINT" and request.agreed(1)
        os.kill(os.getpid(), signal.SIGINT)  # the same keypress forwarded by torchrun: ignored
        monkeypatch.setattr(stop, "DUPLICATE_S", 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        request.close()
    assert signal.getsignal(signal.SIGINT) == before  # the handler it found is back


# --- a full disk under the text log ---------------------------------------------------------------
def test_a_log_on_a_full_disk_reports_once(capsys):
    from bnonly_dist.logsafe import SafeFileHandler
    handler = SafeFileHandler("/dev/full")  # every write fails with ENOSPC
    logger = logging.getLogger("test-full-disk")
    logger.addHandler(handler)
    try:
        for i in range(20):
            logger.error("line %d", i)
    finally:
        logger.removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnonly: warning: cannot write /dev/full (No space left")
