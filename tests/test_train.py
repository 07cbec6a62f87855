import json
import shutil
import subprocess

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from bnonly_dist import config, engines, models, modes
from bnonly_dist.config import ConfigError
from bnonly_dist.engines.base import Engine
from bnonly_dist.run import checkpoint, train
from bnonly_dist.run.checkpoint import CheckpointError


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_everything_a_researcher_reads(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summary = train.run(tiny_cfg(), run_dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "rank0.log").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(2, 21, 2))
    for key in ("loss", "top1", "lr", "images_per_s", "data_wait_frac"):
        assert key in train_rows[0]
    assert [r["step"] for r in eval_rows] == [10, 20]  # every epoch
    assert all(r["count"] == 103 for r in eval_rows)  # every validation image, once
    assert 0 <= eval_rows[-1]["gamma_small_frac"] <= 1 and "gamma_small_frac/layer3" in eval_rows[-1]
    assert train_rows[0]["lr"] == 0.1 and train_rows[-1]["lr"] == pytest.approx(0.01)  # milestone at epoch 1
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["final"] == {k: v for k, v in eval_rows[-1].items() if k not in ("kind", "step")}
    assert saved["trainable_params"] == models.info("cifar_resnet_14")["bn"]
    assert len(saved["fingerprint"]) == 64 and saved["finished"]
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["step_00000016", "step_00000020"]


def test_tensorboard_has_scalars_and_gamma_histograms(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    train.run(tiny_cfg("train.max_steps=10"), run_dir)
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait_frac", "eval/top1", "eval/top5",
                "eval/gamma_small_frac", "eval/gamma_small_frac/layer2"):
        assert tag in tags["scalars"], tag
    assert {"gamma/stem", "gamma/layer1", "beta/layer3"} <= set(tags["histograms"])
    # the small-gamma fraction per stage is also logged with every train line, between evaluations
    live = events.Scalars("train/gamma_small_frac/layer2")
    assert len(live) > len(events.Scalars("eval/gamma_small_frac/layer2")) and all(0 <= e.value <= 1 for e in live)


def test_training_learns_and_changes_only_bn(tiny_cfg, tmp_path):
    cfg = tiny_cfg("optim.epochs=8", "optim.milestones=[6]")
    summary = train.run(cfg, tmp_path / "run")
    # The generated classes are learnable: 34-37 % for seeds 0-2, against 10 % by chance.
    assert summary["final"]["top1"] > 25
    model = models.build(cfg.model.arch, 10, cfg.seed, cfg.model.bn_init)
    modes.apply(model, cfg.mode, cfg.seed)
    path = checkpoint.latest(tmp_path / "run")
    trained = models.build(cfg.model.arch, 10, cfg.seed, cfg.model.bn_init)
    modes.apply(trained, cfg.mode, cfg.seed)
    checkpoint.load(path, Engine(trained, None, {}, 0.0), 0, 1, checkpoint.frozen_digest(trained))
    for (name, a), (_, b) in zip(model.named_parameters(), trained.named_parameters()):
        assert torch.equal(a, b) != (models.parameter_roles(model)[name] == "bn"), name


def test_resume_is_bit_exact(tiny_cfg, tmp_path):
    whole = train.run(tiny_cfg(), tmp_path / "whole")
    part = tmp_path / "part"
    first = train.run(tiny_cfg("train.max_steps=13"), part)  # stops mid-epoch 1
    assert first["step"] == 13 and first["finished"]  # at its train.max_steps; the next start asks for more
    resumed = train.run(tiny_cfg(), part)
    assert resumed["fingerprint"] == whole["fingerprint"]
    assert resumed["final"]["top1"] == whole["final"]["top1"]
    # summary.json's time: this part's, and over both parts (the first up to the checkpoint resumed from)
    assert (whole["parts"], whole["total_wall_time_s"]) == (1, whole["wall_time_s"])
    assert resumed["parts"] == 2
    assert resumed["wall_time_s"] < resumed["total_wall_time_s"] <= resumed["wall_time_s"] + first["wall_time_s"]


def test_memory_options_may_change_on_resume(tiny_cfg, tmp_path):
    """Lean autograd, checkpointed stages and the frozen dtype change memory, not the run."""
    part = tmp_path / "part"
    first = train.run(tiny_cfg("train.precision=bf16", "train.frozen_dtype=fp32", "train.lean_autograd=false",
                               "train.max_steps=13"), part)
    resumed = train.run(tiny_cfg("train.precision=bf16", "train.frozen_dtype=bf16", "train.lean_autograd=true",
                                 "train.activation_checkpointing=[1]"), part)
    assert first["step"] == 13 and resumed["finished"] and resumed["trainable_params"] == first["trainable_params"]
    log_text = (part / "logs" / "rank0.log").read_text()
    assert "resumed from" in log_text and "lean autograd True (train.lean_autograd), checkpointed stages 1," in log_text


def test_resume_skips_a_damaged_checkpoint_and_unfinished_saves(tiny_cfg, tmp_path):
    whole = train.run(tiny_cfg(), tmp_path / "whole")
    part = tmp_path / "part"
    train.run(tiny_cfg("train.max_steps=13"), part)
    ckpts = checkpoint.complete_checkpoints(part)
    assert [p.name for p in ckpts] == ["step_00000012", "step_00000013"]
    shard = next(ckpts[-1].glob("state/*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated after it was committed
    (part / "checkpoints" / ".tmp-step_00000014").mkdir()  # a save killed before its commit
    (part / "checkpoints" / "step_00000016").mkdir()  # no commit marker (a foreign or legacy folder)
    (part / "checkpoints" / "step_00000016" / "junk").write_text("x")
    resumed = train.run(tiny_cfg(), part)
    assert resumed["fingerprint"] == whole["fingerprint"]
    assert "trying the one before" in (part / "logs" / "rank0.log").read_text()
    assert (part / "checkpoints" / "step_00000016" / "commit.json").is_file()  # saved over it


def test_frozen_weight_mismatch_is_an_error(tiny_cfg, tmp_path):
    train.run(tiny_cfg("train.max_steps=4"), tmp_path / "run")
    model = models.build("cifar_resnet_14", 10, seed=99)
    modes.apply(model, "bn", 99)
    with pytest.raises(checkpoint.FrozenWeightsMismatch, match="frozen weights"):
        checkpoint.load(checkpoint.latest(tmp_path / "run"), Engine(model, None, {}, 0.0), 0, 1,
                        checkpoint.frozen_digest(model))


def test_run_dir_refuses_a_different_config(tiny_cfg, tmp_path):
    train.run(tiny_cfg("train.max_steps=2"), tmp_path / "run")
    with pytest.raises(ConfigError, match="optim.lr=0.1, not 0.2"):
        train.run(tiny_cfg("train.max_steps=2", "optim.lr=0.2"), tmp_path / "run")


@pytest.mark.parametrize("mode", ["none", "random_per_channel", "all"])
def test_other_modes_run(tiny_cfg, tmp_path, mode):
    summary = train.run(tiny_cfg(f"mode={mode}", "train.max_steps=3"), tmp_path / "run")
    assert summary["step"] == 3 and summary["final"]["count"] == 103


def test_imagenet_with_dali_end_to_end(imagenet_root, tmp_path):
    cfg = config.load("configs/imagenet_resnet18.yaml", [
        f"data.root={imagenet_root}", "model.arch=imagenet_resnet_18_8", "data.batch_size=8",
        "train.bn_batch=8", "data.eval_batch_size=6",
        "data.image_size=32", "data.resize_size=40", "data.num_threads=1", "optim.epochs=2", "optim.warmup_epochs=1",
        "train.device=cpu", "train.log_every=1", "train.checkpoint_every=3", "train.progress=lines"])
    part = train.run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 6})}), tmp_path / "r")
    assert part["step"] == 6
    summary = train.run(cfg, tmp_path / "r")  # resumes mid-epoch 1 with the saved DALI state
    rows = read_metrics(tmp_path / "r")
    assert summary["step"] == 8 and summary["final"]["count"] == 20 and summary["trainable_params"] > 0
    assert summary["fingerprint"] == train.run(cfg, tmp_path / "whole")["fingerprint"]
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # linear warm-up over the first epoch


def test_bf16_and_channels_last_path_runs(tiny_cfg, tmp_path):
    summary = train.run(tiny_cfg("train.precision=bf16", "train.channels_last=true", "train.max_steps=3"), tmp_path / "r")
    assert summary["step"] == 3 and summary["final"]["count"] == 103


def test_full_disk_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train.run(tiny_cfg("train.max_steps=4"), run_dir)
    good = checkpoint.latest(run_dir)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engines.base.dcp, "save", no_space)
    with pytest.raises(CheckpointError, match="free disk space.*resumes from .*step_00000004"):
        train.run(tiny_cfg("train.max_steps=8"), run_dir)
    assert checkpoint.latest(run_dir) == good and (good / "state" / ".metadata").is_file()
    assert not list((run_dir / "checkpoints").glob(".tmp-*/commit.json"))


def test_torch_compile_path_runs(tiny_cfg, tmp_path):
    summary = train.run(tiny_cfg("train.compile=true", "train.max_steps=2"), tmp_path / "r")
    assert summary["step"] == 2 and summary["final"]["count"] == 103


def test_save_frozen_stores_and_restores_the_frozen_weights(tiny_cfg, tmp_path):
    lean, full = tmp_path / "lean", tmp_path / "full"
    train.run(tiny_cfg("train.max_steps=4"), lean)
    train.run(tiny_cfg("train.max_steps=4", "dist.save_frozen=true"), full)
    stored = {p: set(FileSystemReader(checkpoint.latest(p) / "state").read_metadata().state_dict_metadata)
              for p in (lean, full)}
    assert "model.conv1.weight" in stored[full] - stored[lean]
    assert "model.bn1.weight" in stored[lean] and "model.bn1.running_mean" in stored[lean]
    trained = models.build("cifar_resnet_14", 10, seed=0)
    modes.apply(trained, "bn", 0)
    other_seed = models.build("cifar_resnet_14", 10, seed=99)  # different frozen weights: no error, they are replaced
    modes.apply(other_seed, "bn", 99)
    checkpoint.load(checkpoint.latest(full), Engine(other_seed, None, {}, 0.0), 0, 1, checkpoint.frozen_digest(other_seed))
    assert checkpoint.frozen_digest(other_seed) == checkpoint.frozen_digest(trained)


def test_no_readable_checkpoint_stops_instead_of_starting_over(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train.run(tiny_cfg("train.max_steps=8"), run_dir)
    for shard in (run_dir / "checkpoints").glob("step_*/state/*.distcp"):
        shard.write_bytes(b"")
    (run_dir / "checkpoints" / "step_00000099").mkdir()  # no commit.json: not a checkpoint
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        train.run(tiny_cfg(), run_dir)


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs: a real full disk (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_loses_nothing(tiny_cfg, small_disk, tmp_path):
    cfg = tiny_cfg("train.checkpoint_every=2", "train.keep_checkpoints=5", "train.log_every=5")
    with pytest.raises(CheckpointError, match="No space left on device.*resumes from .*step_"):
        train.run(cfg, small_disk / "run")
    last = checkpoint.latest(small_disk / "run")
    assert last is not None and not list((small_disk / "run" / "checkpoints").glob(".tmp-*"))
    shutil.copytree(small_disk / "run", tmp_path / "moved")  # the user makes room elsewhere and goes on
    resumed = train.run(cfg, tmp_path / "moved")
    assert resumed["fingerprint"] == train.run(cfg, tmp_path / "whole")["fingerprint"]
    log = (tmp_path / "moved" / "logs" / "rank0.log").read_text()
    assert f"resumed from {tmp_path / 'moved' / 'checkpoints' / last.name}" in log
