"""The fault table: bad inputs and broken run directories through the real CLI, and SIGKILL at random moments.

Every row runs `python -m bnonly_dist.cli ...` as a subprocess and asserts: a non-zero
exit, at most 3 lines on stderr, no traceback, the message names the file or key, and
nothing that existed before (checkpoints, summary.json, config.yaml, metrics) was removed
or changed (a damaged checkpoint may only be renamed to step_X.damaged).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from launch import committed_steps

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/cifar10_resnet14.yaml"
IGNORED = ("logs", "tb", ".lock")  # written by any start; never part of what must survive


def base_overrides(cifar_root) -> list[str]:
    return [f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "data.eval_batch_size=50", "optim.epochs=1",
            "optim.milestones=[1]", "train.device=cpu", "train.deterministic=true", "train.log_every=5",
            "train.checkpoint_every=4", "train.progress=lines"]


def cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))}
    return subprocess.run([sys.executable, "-m", "bnonly_dist.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def tree(root: Path) -> dict[str, str]:
    """{relative path (damaged suffix removed): sha256} of every file that must survive a failed command."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(IGNORED):
            out[re.sub(r"\.damaged(-\d+)?(?=/|$)", "", rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(cifar_root, tmp_path_factory):
    """One finished CIFAR ResNet-14 run (10 steps, checkpoints at 8 and 10), made once by the CLI."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = cli("train", CONFIG, *base_overrides(cifar_root), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed_steps(run_dir) == [8, 10] and (run_dir / "summary.json").is_file()
    return run_dir


@dataclass
class Env:
    """What a row may touch: its own copy of the finished run, a scratch folder, the data sets."""
    run: Path
    tmp: Path
    cifar: Path
    imagenet: Path
    base: list[str]
    watched: list[Path] = field(default_factory=list)
    cleanups: list[Callable] = field(default_factory=list)

    def train(self, *overrides: str, run_dir: Path | None = None, config: str = CONFIG) -> list[str]:
        return ["train", config, *self.base, *overrides, "--run-dir", str(run_dir or self.run)]

    def mount(self, target: Path, *options: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", *options, str(target)], capture_output=True).returncode:
            pytest.skip("cannot mount here (needs root)")
        self.cleanups.append(lambda: subprocess.run(["umount", "-l", str(target)], capture_output=True))


# --- the rows: (setup(env) -> argv, text the message must contain, marks) ---------------------
def config_file(env: Env, content: bytes, name: str = "bad.yaml") -> Path:
    path = env.tmp / name
    path.write_bytes(content)
    return path


def cifar_copy(env: Env) -> Path:
    root = env.tmp / "cifar"
    shutil.copytree(env.cifar, root)
    return root / "cifar-10-batches-py"


def imagenet_copy(env: Env) -> Path:
    root = env.tmp / "imagenet"
    shutil.copytree(env.imagenet, root)
    return root


def imagenet_args(env: Env, root: Path, *extra: str) -> list[str]:
    return ["train", "configs/imagenet_resnet18.yaml", f"data.root={root}", "model.arch=imagenet_resnet_18_8",
            "data.batch_size=8", "train.bn_batch=8", "data.eval_batch_size=6", "data.image_size=32", "data.resize_size=40",
            "data.num_threads=1", "train.device=cpu", "data.decode=cpu", *extra, "--run-dir", str(env.tmp / "in-run")]


def fresh(env: Env) -> Path:  # a run dir that does not exist yet
    return env.tmp / "fresh-run"


def run_dir_is_file(env):
    (env.tmp / "afile").write_text("x")
    env.watched.append(env.tmp / "afile")
    return env.train(run_dir=env.tmp / "afile"), "afile"


def run_dir_under_file(env):
    (env.tmp / "afile").write_text("x")
    return env.train(run_dir=env.tmp / "afile" / "runs" / "r"), "afile"


def runs_root_read_only(env):
    env.mount(env.tmp / "ro", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs")
    return env.train(run_dir=env.tmp / "ro" / "runs" / "r"), "ro"


def checkpoints_is_file(env):
    shutil.rmtree(env.run / "checkpoints")
    (env.run / "checkpoints").write_text("not a folder")
    return env.train(), "checkpoints"


def checkpoints_read_only(env):
    folder = env.run / "checkpoints"
    env.mount(folder, "--bind", str(folder))
    if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only here")
    return env.train("train.max_steps=12"), "checkpoints"


def unfinished(env: Env) -> None:
    """The run as a stop signal leaves it (no summary.json): a re-run resumes instead of saying it is done."""
    (env.run / "summary.json").unlink()


def run_dir_in_use(env):
    unfinished(env)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from bnonly_dist.run import rundir; "
                               f"rundir.acquire({str(env.run)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    env.cleanups.append(lambda: (holder.kill(), holder.wait()))
    assert holder.stdout.readline().strip() == "held"
    return env.train("train.max_steps=12"), f"in use by another trainer (pid {holder.pid}"


def config_yaml_deleted_other_lr(env):
    (env.run / "config.yaml").unlink()
    return env.train("optim.lr=0.5"), "optim.lr=0.1, not 0.5"


def config_yaml_garbage_other_lr(env):
    (env.run / "config.yaml").write_text("optim: [unclosed\n")
    return env.train("optim.lr=0.5"), "optim.lr=0.1, not 0.5"


def config_yaml_latin1_other_lr(env):
    (env.run / "config.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    return env.train("optim.lr=0.5"), "optim.lr=0.1, not 0.5"


def config_yaml_corrupt_no_checkpoints(env):
    shutil.rmtree(env.run / "checkpoints")
    (env.run / "config.yaml").write_bytes(b"\x00\xff garbage: [")
    return env.train(), "config.yaml"


def all_checkpoints_truncated(env):
    unfinished(env)
    for shard in (env.run / "checkpoints").glob("step_*/state/*.distcp"):
        shard.write_bytes(shard.read_bytes()[:64])
    return env.train(), "none of the 2 checkpoints"


def all_markers_garbage(env):
    unfinished(env)
    for marker in (env.run / "checkpoints").glob("step_*/commit.json"):
        marker.write_text('{"step": "eight"}')
    return env.train(), "none of the 2 checkpoints"


def num_classes_too_small(env):
    return env.train("model.num_classes=5", run_dir=fresh(env)), "model.num_classes=5"


def cifar_batch_garbage(env):
    folder = cifar_copy(env)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    return env.train(f"data.root={folder.parent}", run_dir=fresh(env)), "data_batch_3"


def cifar_test_batch_missing(env):
    folder = cifar_copy(env)
    (folder / "data_batch_2").unlink()
    return env.train(f"data.root={folder.parent}", run_dir=fresh(env)), "data_batch_2"


def cifar_labels_out_of_range(env):
    folder = cifar_copy(env)
    with open(folder / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    entry[b"labels"][0] = 11
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(entry, f)
    return env.train(f"data.root={folder.parent}", run_dir=fresh(env)), "test_batch"


def val_text_file_named_jpeg(env):
    root = imagenet_copy(env)
    bad = next((root / "val").glob("*/*.JPEG"))
    bad.write_text("this is not an image\n")
    return imagenet_args(env, root), bad.name


def val_extra_class(env):
    root = imagenet_copy(env)
    (root / "val" / "n99999999").mkdir()
    return imagenet_args(env, root), "n99999999"


def empty_class_folder(env):
    root = imagenet_copy(env)
    for image in (root / "train" / "n10000000").iterdir():
        image.unlink()
    return imagenet_args(env, root), "n10000000"


def analyze_corrupt_summary(env):
    (env.run / "summary.json").write_text('{"finished": tr')
    return ["analyze", str(env.run), "--out", str(env.tmp / "out"), "--no-ablation"], "summary.json"


def fake_cifar_under_file(env):
    (env.tmp / "afile").write_text("x")
    return ["data", "fake-cifar10", str(env.tmp / "afile" / "data")], "afile"


def fake_imagenet_under_file(env):
    (env.tmp / "afile").write_text("x")
    return ["data", "fake-imagenet", str(env.tmp / "afile" / "data"), "--classes", "2"], "afile"


def disk_full_at_a_save(env):
    disk = env.tmp / "disk"
    env.mount(disk, "-t", "tmpfs", "-o", "size=600k", "tmpfs")
    return env.train("train.checkpoint_every=2", "train.keep_checkpoints=9", run_dir=disk / "run"), str(disk / "run")


def disk_full_while_logging(env):
    disk = env.tmp / "disk"
    env.mount(disk, "-t", "tmpfs", "-o", "size=600k", "tmpfs")
    (disk / "filler").write_bytes(bytes((600 - 24) * 1024))  # 24 KiB left: the logs and metrics fill it
    return env.train("train.checkpoint_every=1000", "train.log_every=1", run_dir=disk / "run"), str(disk / "run")


def disk_full_in_tensorboard(env):
    """60 KiB left: TensorBoard's writer thread meets the full disk first (its traceback is not printed)."""
    disk = env.tmp / "disk"
    env.mount(disk, "-t", "tmpfs", "-o", "size=600k", "tmpfs")
    (disk / "filler").write_bytes(bytes((600 - 60) * 1024))
    return env.train("model.arch=cifar_resnet_8", "train.checkpoint_every=1000", "train.log_every=1",
                     run_dir=disk / "run"), str(disk / "run")


def static(argv: list[str], names: str):
    """A row whose command needs no setup: argv may name {run}, {tmp}, {cifar} and {fresh}."""
    def setup(env):
        fill = {"run": str(env.run), "tmp": str(env.tmp), "cifar": str(env.cifar), "fresh": str(fresh(env))}
        return [a.format(**fill) for a in argv], names.format(**fill)
    return setup


def train_with(*overrides: str, names: str, run_dir: str = "{fresh}"):
    return static(["train", CONFIG, "data.root={cifar}", "train.device=cpu", *overrides, "--run-dir", run_dir], names)


def yaml_row(content: bytes, names: str = "bad.yaml"):
    def setup(env):
        return ["train", str(config_file(env, content)), "--run-dir", str(fresh(env))], names
    return setup


def base_cycle(env):
    config_file(env, b"base: b.yaml\n", "a.yaml")
    config_file(env, b"base: a.yaml\n", "b.yaml")
    return ["train", str(env.tmp / "a.yaml"), "--run-dir", str(fresh(env))], "a.yaml"


ROWS = [
    # config keys and values
    ("unknown-key", train_with("train.foo=1", names="train.foo"), ()),
    ("wrong-type", train_with("optim.lr=fast", names="optim.lr"), ()),
    ("lr-negative", train_with("optim.lr=-1", names="optim.lr"), ()),
    ("lr-inf", train_with("optim.lr=.inf", names="optim.lr"), ()),
    ("lr-nan", train_with("optim.lr=.nan", names="optim.lr"), ()),
    ("momentum-one", train_with("optim.momentum=1", names="optim.momentum"), ()),
    ("seed-negative", train_with("seed=-1", names="seed"), ()),
    ("override-without-equals", train_with("optim.lr", names="optim.lr"), ()),
    ("override-bad-key", train_with("1abc=2", names="1abc"), ()),
    ("milestones-unsorted", train_with("optim.milestones=[9,3]", names="milestones"), ()),
    ("mode-unknown", train_with("mode=bnn", names="mode"), ()),
    ("arch-unknown", train_with("model.arch=resnet_x", names="model.arch"), ()),
    ("batch-size-zero", train_with("data.batch_size=0", names="data.batch_size"), ()),
    ("num-classes-one", train_with("model.num_classes=1", names="model.num_classes"), ()),
    ("checkpointing-stage-4-on-cifar", train_with("train.activation_checkpointing=[4]",
                                                  names="train.activation_checkpointing"), ()),
    ("bf16-frozen-with-fp32", train_with("train.precision=fp32", "train.frozen_dtype=bf16", names="frozen_dtype"), ()),
    ("decode-mixed-on-cpu", train_with("data.name=imagenet", "data.decode=mixed", names="data.decode"), ()),
    ("cuda-without-gpu", train_with("train.device=cuda", names="train.device"),
     (pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"))),
    # config files
    ("config-missing", static(["train", "{tmp}/nope.yaml"], "nope.yaml"), ()),
    ("config-not-yaml", yaml_row(b"optim: [unclosed\n"), ()),
    ("config-not-utf8", yaml_row("name: caf\xe9\n".encode("latin-1")),
     ()),
    ("config-a-list", yaml_row(b"- 1\n- 2\n"), ()),
    ("config-base-cycle", base_cycle, ()),
    ("config-a-folder", static(["train", "{tmp}"], "{tmp}"), ()),
    # run directories
    ("run-dir-is-a-file", run_dir_is_file, ()),
    ("run-dir-under-a-file", run_dir_under_file, ()),
    ("runs-root-read-only", runs_root_read_only, ()),
    ("checkpoints-is-a-file", checkpoints_is_file, ()),
    ("checkpoints-read-only", checkpoints_read_only, ()),
    ("run-dir-in-use", run_dir_in_use, ()),
    ("run-dir-other-config", lambda env: (env.train("optim.lr=0.2"), "optim.lr"), ()),
    ("config-yaml-deleted-other-lr", config_yaml_deleted_other_lr, ()),
    ("config-yaml-garbage-other-lr", config_yaml_garbage_other_lr, ()),
    ("config-yaml-latin1-other-lr", config_yaml_latin1_other_lr, ()),
    ("config-yaml-corrupt-no-checkpoints", config_yaml_corrupt_no_checkpoints, ()),
    # checkpoints
    ("all-checkpoints-truncated", all_checkpoints_truncated, ()),
    ("all-markers-garbage", all_markers_garbage, ()),
    # data
    ("data-root-unset", static(["train", CONFIG, "train.device=cpu", "--run-dir", "{fresh}"], "data.root"), ()),
    ("data-root-missing", train_with("data.root={tmp}/nowhere", names="nowhere"), ()),
    ("num-classes-below-labels", num_classes_too_small, ()),
    ("cifar-batch-garbage", cifar_batch_garbage, ()),
    ("cifar-batch-missing", cifar_test_batch_missing, ()),
    ("cifar-labels-out-of-range", cifar_labels_out_of_range, ()),
    ("val-text-file-named-jpeg", val_text_file_named_jpeg, ()),
    ("val-class-not-in-train", val_extra_class, ()),
    ("empty-class-folder", empty_class_folder, ()),
    ("disk-full-at-a-save", disk_full_at_a_save, ()),
    ("disk-full-while-logging", disk_full_while_logging, ()),
    ("disk-full-in-tensorboard", disk_full_in_tensorboard, ()),
    # other commands
    ("analyze-corrupt-summary", analyze_corrupt_summary, ()),
    ("analyze-missing-path", static(["analyze", "{tmp}/nowhere", "--out", "{tmp}/out"], "nowhere"), ()),
    ("fake-cifar10-under-a-file", fake_cifar_under_file, ()),
    ("fake-imagenet-under-a-file", fake_imagenet_under_file, ()),
    ("fake-imagenet-bad-sides", static(["data", "fake-imagenet", "{tmp}/d", "--min-side", "9", "--max-side", "9"],
                                       "--min-side"), ()),
    ("data-check-missing", static(["data", "check", "{tmp}/nowhere"], "nowhere"), ()),
    ("bench-steps-zero", static(["bench", CONFIG, "train.device=cpu", "--steps", "0"], "--steps"),
     ()),
    ("bench-unknown-variant", static(["bench", CONFIG, "--variants", "fast"], "fast"), ()),
    ("model-info-unknown-arch", static(["model-info", "resnet_x"], "resnet_x"), ()),
    ("sweep-file-missing", static(["sweep-points", "{tmp}/sweep.yaml"], "sweep.yaml"), ()),
]


@pytest.mark.parametrize("setup", [pytest.param(s, id=i, marks=m) for i, s, m in ROWS])
def test_a_bad_input_is_one_line_and_loses_nothing(setup, finished_run, cifar_root, imagenet_root, tmp_path):
    env = Env(tmp_path / "run", tmp_path / "scratch", cifar_root, imagenet_root, base_overrides(cifar_root))
    shutil.copytree(finished_run, env.run)
    env.tmp.mkdir()
    try:
        argv, names = setup(env)
        before = {p: tree(p) for p in [env.run, *env.watched]}
        done = cli(*argv)
        after = {p: tree(p) for p in before}
    finally:
        for cleanup in reversed(env.cleanups):
            cleanup()
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, f"exit 0:\n{done.stdout[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert 1 <= len(lines) <= 3, done.stderr[-3000:]
    assert names in done.stderr, done.stderr
    assert after == before, "files that existed before were changed or removed"


# --- not a failure: a broken run among others must not cost the table ------------------------------
def test_analyze_skips_a_corrupt_run_and_a_torn_line(finished_run, tmp_path):
    runs = tmp_path / "runs"
    for name in ("good", "torn", "corrupt"):
        shutil.copytree(finished_run, runs / name)
    with open(runs / "torn" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 1')  # a kill in the middle of a line
    (runs / "corrupt" / "summary.json").write_bytes(b"\x00\x00")
    done = cli("analyze", str(runs), "--out", str(tmp_path / "out"), "--no-ablation")
    assert done.returncode == 0, done.stderr
    assert "2 runs in 1 groups" in done.stdout
    assert f"{runs / 'corrupt' / 'summary.json'} is unreadable" in done.stderr
    assert f"{runs / 'torn' / 'metrics.jsonl'}: line" in done.stderr and "Traceback" not in done.stderr
