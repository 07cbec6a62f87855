"""A run's identity holds what its data is, not where it lies: a copy elsewhere resumes, other data is refused."""
from __future__ import annotations

import json
import shutil

import pytest

from bnonly_dist import cli
from bnonly_dist.config import ConfigError
from bnonly_dist.data import fake, identity, layout
from bnonly_dist.run import paths, train


# tiny_cfg's overrides (conftest.py) but data.root, as command-line words
TINY = ["data.batch_size=32", "train.bn_batch=32", "data.eval_batch_size=50", "optim.epochs=2", "optim.milestones=[1]",
        "train.device=cpu", "train.deterministic=true", "train.log_every=2", "train.checkpoint_every=4", "train.progress=lines"]


def _files(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.name != ".lock" and "logs" not in p.parts}


def test_data_copied_elsewhere_resumes_bit_for_bit_with_the_same_command(tiny_cfg, cifar_root, tmp_path):
    copy = tmp_path / "node-local" / "cifar"
    shutil.copytree(cifar_root, copy)
    small = [f"runs_root={tmp_path / 'runs'}", "model.arch=cifar_resnet_8", "optim.epochs=1"]
    first = train.run(tiny_cfg(*small, "train.max_steps=5"))  # stops mid-epoch with a checkpoint at step 4
    moved = tiny_cfg(*small, f"data.root={copy}")
    assert paths.run_dir(moved) == paths.run_dir(tiny_cfg(*small))  # the same run directory, derived as before
    resumed = train.run(moved)
    whole = train.run(tiny_cfg(*small), tmp_path / "whole")
    assert first["step"] == 5 and resumed["finished"] and resumed["fingerprint"] == whole["fingerprint"]
    record = json.loads((paths.RunPaths(paths.run_dir(moved)).data).read_text())
    assert record["name"] == "cifar10" and record["train_images"] == 320 and record["digest"].startswith("sha256:")


def test_other_data_is_refused_in_one_line_and_nothing_is_deleted(tiny_cfg, cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = ["model.arch=cifar_resnet_8", "train.max_steps=4"]
    train.run(tiny_cfg(*overrides), run_dir)
    before = _files(run_dir)
    other = tmp_path / "other"
    fake.write_cifar10(other, train_size=320, test_size=103, seed=1)  # the same counts, other images
    argv = ["train", "configs/cifar10_resnet14.yaml", *TINY, "model.arch=cifar_resnet_8", "train.max_steps=8",
            f"data.root={other}", "--run-dir", str(run_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run_dir} holds a run trained on other data than data.root={other}" in err[0], err
    assert "another image and label arrays" in err[0] and f"{run_dir / 'data.json'}" in err[0]
    assert _files(run_dir) == before  # nothing removed, rewritten or added
    # bnonly eval checks the data as a start does, and records what each evaluation used.
    assert cli.main(["eval", str(run_dir), f"data.root={other}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on other data" in err[0] and "--other-data" in err[0], err
    assert _files(run_dir) == before
    assert cli.main(["eval", str(run_dir), f"data.root={other}", "--other-data"]) == 0
    assert cli.main(["eval", str(run_dir)]) == 0  # the data it trained on (config.yaml's data.root)
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(r["data_root"], r["training_data"]) for r in rows] == [(str(other), False), (str(cifar_root), True)]
    assert rows[0]["data"]["digest"] != rows[1]["data"]["digest"] == json.loads((run_dir / "data.json").read_text())["digest"]
    # Without data.json the newest checkpoint's marker says the same.
    (run_dir / "data.json").unlink()
    with pytest.raises(ConfigError, match="commit.json"):
        train.run(tiny_cfg("model.arch=cifar_resnet_8", "train.max_steps=8", f"data.root={other}"), run_dir)


def test_an_imagenet_record_is_the_file_list_wherever_it_lies(imagenet_root, tmp_path):
    def record(root):
        classes, train_items, val_items = layout.imagenet_index(root)
        return identity.of_listing("imagenet", str(root), classes, train_items, val_items)

    copy = tmp_path / "copy"
    shutil.copytree(imagenet_root, copy)
    assert record(copy) == record(imagenet_root)
    assert record(str(copy) + "/") == record(imagenet_root)  # a trailing slash is the same folder
    some = sorted((copy / "train").rglob("*.JPEG"))[3]
    some.write_bytes(some.read_bytes() + b"\0")  # one file one byte longer
    changed = record(copy)
    assert changed["train_images"] == record(imagenet_root)["train_images"]
    assert identity.difference(record(imagenet_root), changed) == (
        "the same counts but another file list (names, labels, sizes)")
    some.unlink()
    assert identity.difference(record(imagenet_root), record(copy)) == "train_images=32, not 31"
