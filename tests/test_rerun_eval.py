"""Re-running a finished run changes nothing; `bnonly eval` evaluates a run on purpose; a
diverging run stops with one line and keeps its last good checkpoint."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from bnonly_dist.run import checkpoint, train


def tree_digest(root):
    """Every file's name and bytes but the lock's, which names whoever held the run dir last (a re-run holds it
    while it reads the summary)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock"):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "bnonly_dist.cli", *args], capture_output=True, text=True)


def test_rerun_of_a_finished_run_changes_nothing_and_eval_writes_its_own_file(tiny_cfg, tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    summary = train.run(tiny_cfg("train.max_steps=12"), run_dir)
    log_text = (run_dir / "logs" / "rank0.log").read_text()  # it spoke early: plan, data path, first step
    assert "plan: device cpu" in log_text and "data: CIFAR-10 from" in log_text and "first step done" in log_text
    before = tree_digest(run_dir)
    again = train.run(tiny_cfg("train.max_steps=12"), run_dir)
    assert again == json.loads((run_dir / "summary.json").read_text())
    assert tree_digest(run_dir) == before  # no eval row, no events file, same wall time and world

    proc = cli("train", "configs/cifar10_resnet14.yaml", f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32",
               "data.eval_batch_size=50", "optim.epochs=2", "optim.milestones=[1]", "train.device=cpu",
               "train.deterministic=true", "train.log_every=2", "train.checkpoint_every=4", "train.progress=lines",
               "train.max_steps=12", "--run-dir", str(run_dir))
    assert proc.returncode == 0 and "finished at step 12" in proc.stdout and "nothing to do" in proc.stdout
    assert tree_digest(run_dir) == before

    proc = cli("eval", str(run_dir), f"data.root={cifar_root}")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 12 and rows[0]["count"] == 103
    assert rows[0]["top1"] == summary["final"]["top1"] and rows[0]["top5"] == summary["final"]["top5"]
    per_class = rows[0]["per_class_top1"]
    assert len(per_class) == 10 and all(0 <= p <= 100 for p in per_class if p == p)
    assert not any('"per_class_top1"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    refused = cli("eval", str(run_dir), "optim.lr=0.5")
    assert refused.returncode == 2 and "optim.lr cannot change" in refused.stderr and "Traceback" not in refused.stderr


def test_a_diverging_run_stops_with_one_line_and_keeps_its_checkpoints(tiny_cfg, tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    train.run(tiny_cfg("train.max_steps=4"), run_dir)
    good = [p.name for p in checkpoint.complete_checkpoints(run_dir)]
    proc = cli("train", "configs/cifar10_resnet14.yaml", f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32",
               "data.eval_batch_size=50", "optim.epochs=2", "optim.milestones=[1]", "train.device=cpu",
               "train.deterministic=true", "train.log_every=1", "train.checkpoint_every=4", "train.progress=lines",
               "optim.lr=1.0e+30", "--run-dir", str(tmp_path / "diverged"))
    assert proc.returncode == 3 and "diverged" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no checkpoint was saved" in proc.stderr and "is kept" not in proc.stderr
    assert not checkpoint.complete_checkpoints(tmp_path / "diverged")  # no NaN checkpoint written
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == good


def test_a_loss_gone_bad_between_checks_names_the_check_step_and_the_checkpoint_kept(tiny_cfg, tmp_path,
                                                                                      monkeypatch):
    """The loss is checked at log steps (no GPU sync per step): a NaN at step 3 is caught at step 4."""
    step = train.Run.train_step

    def poisoned(run, images, labels):
        step(run, images, labels)
        if run.step == 3:
            run.meter.add(torch.tensor(float("nan")), torch.tensor(0.0))

    monkeypatch.setattr(train.Run, "train_step", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(train.Diverged) as err:
        train.run(tiny_cfg("train.max_steps=8", "train.log_every=4", "train.checkpoint_every=2"), run_dir)
    saved = checkpoint.complete_checkpoints(run_dir)
    assert [p.name for p in saved] == ["step_00000002"]  # the save at step 4 was refused
    assert "became nan at or before step 4" in str(err.value)
    assert f"the last good checkpoint {saved[0]} is kept" in str(err.value)
