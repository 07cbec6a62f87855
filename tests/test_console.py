"""What a person at the console sees: log lines beside the progress bar, a closed pipe, the words after Ctrl-C."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from test_faults import CONFIG, REPO, base_overrides

from bnonly_dist import cli


def _run_on_terminal(args: list[str], timeout: float = 300) -> str:
    """Run a command with stdout and stderr on one pseudo-terminal; everything it wrote there."""
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns: room for the bar
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError("no output for too long:\n" + b"".join(chunks).decode(errors="replace")[-2000:])
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=60)
    return b"".join(chunks).decode(errors="replace")


def test_log_lines_never_share_the_progress_bar_line(cifar_root, tmp_path):
    out = _run_on_terminal([sys.executable, "-m", "bnonly_dist.cli", "train", CONFIG, *base_overrides(cifar_root),
                            "train.progress=bar", "train.max_steps=6", "train.log_every=2",
                            "--run-dir", str(tmp_path / "run")])
    assert "done: top1" in out, out[-2000:]
    starts = [m.start() for m in re.finditer(r"\d\d:\d\d:\d\d \[rank0\] ", out)]
    assert len(starts) >= 3  # the first-step line, the evaluation, done
    shared = [out[max(0, s - 60):s + 40] for s in starts if s and out[s - 1] not in "\r\n"]
    assert not shared, shared  # each log line starts a line of its own: the bar is cleared first
    assert "it/s" in out or "s/it" in out  # the bar was shown
    assert f"TensorBoard: tensorboard --logdir_spec run:{tmp_path / 'run'}" in out  # named, not "run/."


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`bnonly sweep-points SWEEP | head -1`: the reader is gone before the output comes; no error, exit 0."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"config: {REPO / CONFIG}\ngrid: {{seed: {list(range(50))}}}\n"
                    f"overrides: {{runs_root: {tmp_path / 'runs'}}}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "bnonly_dist.cli", "sweep-points", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # what head does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_an_abort_before_any_checkpoint_does_not_promise_a_resume(tiny_cfg, tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    run_dir = tmp_path / "run"
    argv = ["train", CONFIG, *base_overrides("x"), "--run-dir", str(run_dir)]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == (f"bnonly: interrupted; no checkpoint was saved yet in {run_dir}; "
                                               "run the same command to start again")
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004" / "commit.json").write_text("{}")
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == ("bnonly: interrupted; run the same command to resume from the last "
                                               "checkpoint")


def test_a_missing_data_root_is_a_config_error_everywhere(tmp_path, capsys):
    """bnonly train says what submit.py says, with the same exit status 2, and creates nothing."""
    runs = tmp_path / "runs"
    assert cli.main(["train", "configs/imagenet_resnet18.yaml", f"runs_root={runs}"]) == 2
    assert capsys.readouterr().err.strip() == ("bnonly: config error: data.root is not set for data.name=imagenet; "
                                               "pass data.root=/path/to/imagenet")
    assert not runs.exists()


def test_tensorboard_names_runs_by_their_run_directory(tmp_path):
    """The printed command, as TensorBoard itself reads it, names each run "<run dir>/tb" (not "<run dir>/.")."""
    import shlex

    from bnonly_dist.run.paths import RunPaths, tensorboard_command
    command = tensorboard_command(tmp_path / "a", tmp_path / "b")
    assert command == f"tensorboard --logdir_spec a:{tmp_path / 'a'},b:{tmp_path / 'b'}"
    multiplexer = pytest.importorskip("tensorboard.backend.event_processing.plugin_event_multiplexer")
    for run in ("a", "b"):  # an event file where the run's writer puts it
        (RunPaths(tmp_path / run).tb).mkdir(parents=True)
        (RunPaths(tmp_path / run).tb / "events.out.tfevents.1.host").write_bytes(b"")
    (RunPaths(tmp_path / "a").checkpoints / "step_00000001").mkdir(parents=True)
    spec = shlex.split(command)[-1]
    mux = multiplexer.EventMultiplexer()
    for entry in spec.split(","):
        name, path = entry.split(":", 1)
        mux.AddRunsFromDirectory(path, name)
    assert sorted(mux.Runs()) == ["a/tb", "b/tb"]
