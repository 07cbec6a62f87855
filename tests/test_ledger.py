"""The ledger (run/history.py) and the one decision over it (launch/restart.decide), as tables;
the `bnonly retry` refusals and a Ctrl-C at any moment of `bnonly train`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import history_rows

from bnonly_dist.launch import restart
from bnonly_dist.launch.restart import Outcome, decide
from bnonly_dist.run import history
from bnonly_dist.run.history import Failure, Kind, Ledger, Restart, Stop

REPO = Path(__file__).resolve().parents[1]
OLD_HISTORY = Path(__file__).parent / "data" / "history_before_kinds.jsonl"
K = Kind


def failed(series="7", step=5, cause="rank 0: lost contact (peer 10.0.0.3:29500)", retry=True, attempt=1,
           kind=K.LOST_PEER) -> Failure:
    return Failure(series, series, attempt, step, 1, kind, cause, retry, "x", slurm_run=None, time="t")


def ledger(*rows) -> Ledger:
    return Ledger(tuple(rows))


LOST = "rank 0: lost contact (peer 10.0.0.3:29500)"
SAVE = "rank 1: CheckpointError: saving step_00000008 failed"
# (the ledger before, how the attempt ended, max_failures) -> (retry?, why starts with, the attempt that failed)
CASES = [
    ("a first failure", ledger(), Outcome("7", 5, K.LOST_PEER, LOST, 1), True, "restart 1 of at most 3", 1),
    ("the budget counts the series' retries", ledger(failed(), failed(step=9, attempt=2)),
     Outcome("7", 13, K.LOST_PEER, LOST, 1), True, "restart 3 of at most 3", 3),
    ("the budget used", ledger(*(failed(step=s, attempt=a) for a, s in ((1, 5), (2, 9), (3, 13)))),
     Outcome("7", 17, K.LOST_PEER, LOST, 1), False, "all 3 restarts of --max-failures 3 are used", 4),
    ("another series has its own budget", ledger(*(failed(step=s, attempt=a) for a, s in ((1, 5), (2, 9), (3, 13)))),
     Outcome("8", 21, K.LOST_PEER, LOST, 1), True, "restart 1 of at most 3", 1),
    ("the same error at the same step", ledger(failed(step=8, cause=SAVE, kind=K.ERROR)),
     Outcome("7", 8, K.ERROR, SAVE, 1), False, "it failed at step 8 with the same error as attempt 1", 2),
    ("the same error, other numbers in it", ledger(failed(step=8, cause="rank 0: peer 10.0.0.3:29500")),
     Outcome("7", 8, K.LOST_PEER, "rank 0: peer 10.0.0.4:29511", 1), False, "it failed at step 8 with the same", 2),
    ("the same error at a later step", ledger(failed(step=8, cause=SAVE, kind=K.ERROR)),
     Outcome("7", 12, K.ERROR, SAVE, 1), True, "restart 2 of at most 3", 2),
    ("another error at the same step", ledger(failed(step=8, cause=SAVE, kind=K.ERROR)),
     Outcome("7", 8, K.IO, "rank 0: OSError: Input/output error", 1), True, "restart 2", 2),
    ("two node failures at one step", ledger(failed(step=9, cause=restart.UNASKED_REQUEUE, kind=K.NODE_LOST)),
     Outcome("7", 9, K.NODE_LOST, restart.UNASKED_REQUEUE, None), True, "restart 2 of at most 3", 2),
    ("retrying off", ledger(), Outcome("7", 5, K.SIGNAL, "rank 1: killed by SIGKILL", 137, 0), False,
     "retrying is off (--max-failures 0)", 1),
    ("a stop and a restart are no failures", ledger(Stop("7", "7", 4, "SIGUSR2", requeue=True),
                                                   failed(), Restart("7", "7", 2, 4, None, 1)),
     Outcome("7", 9, K.SIGNAL, "rank 1: killed by SIGKILL", 137), True, "restart 2 of at most 3", 2),
    *[(f"never retried: {kind.value}", ledger(), Outcome("7", 5, kind, "rank 0: x", code), False,
       f"never retried: {why} (exit {code})", 1) for kind, (code, why) in history.NEVER_RETRIED_KINDS.items()],
    ("never retried even with the budget used", ledger(*(failed(attempt=a, step=a) for a in (1, 2, 3))),
     Outcome("7", 5, K.DIVERGED, "rank 0: Diverged: nan", 3), False, "never retried: the loss diverged", 4),
]


@pytest.mark.parametrize("what, before, outcome, retry, why, attempt", CASES, ids=[c[0] for c in CASES])
def test_the_decision_table(what, before, outcome, retry, why, attempt):
    decision = decide(before, outcome)
    assert (decision.retry, decision.attempt) == (retry, attempt) and decision.why.startswith(why), decision


def test_every_kind_has_an_exit_code_and_a_retry_rule():
    for kind in Kind:
        code = history.exit_code(kind)
        assert (kind in history.NEVER_RETRIED_KINDS) == (code != 1)
        assert history.kind_of_exit(code) is (kind if code != 1 else Kind.ERROR)
    assert history.kind_of_exit(137) is Kind.SIGNAL and history.kind_of_exit(None) is Kind.ERROR


def test_the_error_table_names_real_classes():
    import importlib
    for name in history.ERRORS:
        module, cls = name.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), cls), type), name
    from bnonly_dist.run.rundir import RunDirInUse
    assert history.kind_of(RunDirInUse("x")) is Kind.CONFIG and history.kind_of(RuntimeError("x")) is Kind.ERROR
    assert history.kind_of(RuntimeError("CUDA error: an illegal memory access")) is Kind.DEVICE


def test_a_history_written_before_kinds_reads_the_same(tmp_path):
    """A history the code before typed rows wrote (tests/data): every row reads back, each key with its value."""
    shutil.copy(OLD_HISTORY, tmp_path / "history.jsonl")
    old = [json.loads(line) for line in OLD_HISTORY.read_text().splitlines()]
    rows = history.read(tmp_path).rows
    assert [type(r) for r in rows] == [Failure, Restart, Failure, Stop, Stop, Failure, Failure]
    assert [r.kind for r in rows if isinstance(r, Failure)] == [K.LOST_PEER, K.SIGNAL, K.NODE_LOST, K.CONFIG]
    for before, row in zip(old, rows):
        again = history.to_json(row)
        assert {k: again.get(k) for k in before} == before and set(again) - set(before) <= {"kind"}
    assert history.read(tmp_path).retry_pending("4242") == rows[5]  # the node lost, retried, not yet taken up


def test_a_torn_last_line_never_costs_the_next_row(tmp_path):
    """A kill mid-write leaves half a row; the next decision still lands, is counted and announced."""
    for step in (5, 9):
        with history.locked(tmp_path):
            restart.record(tmp_path, Outcome("7", step, K.SIGNAL, f"rank 1: killed by SIGKILL {step}", 137), "7")
        with open(tmp_path / "history.jsonl", "a") as f:
            f.write('{"time": "2026-12-07T10:00:00+00:00", "series": "7", "job": "7", "attem')  # torn
    with history.locked(tmp_path):
        third = restart.record(tmp_path, Outcome("7", 13, K.SIGNAL, "rank 1: killed by SIGKILL", 137), "7")
    assert third.retry and third.why == "restart 3 of at most 3" and third.attempt == 3
    assert [r["attempt"] for r in history_rows(tmp_path)] == [1, 2, 3]
    line = restart.announce_restart(tmp_path, "7", "7")
    assert line.startswith("bnonly: restart 3 of at most 3 after attempt 3 failed at step 13")
    with history.locked(tmp_path):
        fourth = restart.record(tmp_path, Outcome("7", 17, K.SIGNAL, "rank 1: killed by SIGKILL", 137), "7")
    assert not fourth.retry and "all 3 restarts" in fourth.why


def retry_cli(run_dir, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "retry", str(run_dir), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_bnonly_retry_refuses_what_is_no_failure_and_bad_input(tmp_path):
    run_dir = tmp_path / "run"
    missing = retry_cli(run_dir, "--exit-code", 1, "--series", "7")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and not run_dir.exists(), missing.stderr
    run_dir.mkdir()
    success = retry_cli(run_dir, "--exit-code", 0, "--series", "7")
    assert success.returncode == 1 and "exit 0 is a success" in success.stdout, success.stdout + success.stderr
    for flags in (["--requeued", -1], ["--exit-code", -3], ["--exit-code", 300], ["--exit-code", 1, "--since", -5]):
        bad = retry_cli(run_dir, *flags, "--series", "7")
        assert bad.returncode == 2 and f"{flags[-2]} {flags[-1]}: must be" in bad.stderr, (flags, bad.stderr)
    assert history_rows(run_dir) == [] and list(run_dir.iterdir()) == []


def test_a_damaged_failure_note_is_no_note_with_one_warning(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "failure.rank0.json").write_text(json.dumps(
        {"unix_time": time.time(), "rank": 0, "exit": "abc", "line": "x"}))
    (run_dir / "logs" / "failure.rank1.json").write_text("{not json")
    out = retry_cli(run_dir, "--exit-code", 137, "--series", "7")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("bnonly: warning: ignoring the damaged failure note") == 2, out.stderr
    assert "(the job step ended with exit 137 (killed by SIGKILL))" in out.stdout, out.stdout


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_the_start_is_exit_130_in_one_line(cifar_root, tmp_path):
    """While the command imports (cli, config, torch), builds and resumes: one line, exit 130, no traceback. The
    moments count from the end of the interpreter's own start-up (a Ctrl-C inside it is Python's to report)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    interpreter = time.monotonic() - started
    said = 0
    for i, after in enumerate((0.0, 0.2, 0.6, 1.2, 2.0)):
        run_dir = tmp_path / f"run{i}"
        # Ctrl-C as at a terminal's foreground: SIGINT not ignored, even where the suite runs in the background
        # (whose children start with SIGINT ignored, and would then train on to the end).
        proc = subprocess.Popen([sys.executable, "-m", "bnonly_dist.cli", "train", "configs/cifar10_resnet14.yaml",
                                 f"data.root={cifar_root}", "train.device=cpu", "--run-dir", str(run_dir)], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(interpreter + after)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if "received SIGINT: stopping" in err:  # the loop had begun: a first Ctrl-C stops with a checkpoint
            assert proc.returncode == 0, err
            continue
        if "Traceback" in err and "bnonly_dist/" not in err:  # before the command's first line ran: Python's own
            continue
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 130 and "Traceback" not in err and "RecursionError" not in err, (after, err[-3000:])
        assert lines[-1].startswith("bnonly: interrupted"), (after, err)
        assert len([line for line in lines if line.startswith("bnonly:")]) == 1, (after, err)
        said += 1
        note = run_dir / "logs" / "failure.rank0.json"
        if note.is_file():  # noted once the run directory existed: never retried
            assert json.loads(note.read_text())["kind"] == "interrupted"
    assert said >= 3  # most moments fell inside the command, not before it or after its loop began
