"""Two processes over gloo for every engine: same math, exact resume after kills, resharding,
graceful stop, dead ranks. Each test launches real `bnonly train` processes."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from launch import Launch, committed_steps, run, run_torchrun, train_losses
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bnonly_dist import config, engines, models, modes
from bnonly_dist.config import plan
from bnonly_dist.dist import Context
from bnonly_dist.models import memory
from bnonly_dist.run import checkpoint

ENGINES = {"ddp": ["dist.engine=ddp"], "fsdp": ["dist.engine=fsdp"],
           "zero1": ["dist.engine=deepspeed", "dist.zero_stage=1"],
           "zero2": ["dist.engine=deepspeed", "dist.zero_stage=2"],
           "zero3": ["dist.engine=deepspeed", "dist.zero_stage=3"]}
STEPS = 20  # 2 epochs of 10 steps


@pytest.fixture(scope="module")
def overrides(cifar_root):
    def make(engine: str, *extra: str) -> list[str]:
        return [f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "data.eval_batch_size=50", "optim.epochs=2",
                "optim.milestones=[1]", "train.device=cpu", "train.deterministic=true", "train.log_every=1",
                "train.checkpoint_every=4", "train.progress=lines", "dist.timeout_s=30",
                "train.channels_last=false",  # one layout for every engine (FSDP2 shards only NCHW weights)
                *ENGINES[engine], *extra]
    return make


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory):
    """Uninterrupted 2-rank runs, one per engine, made once: {engine: (summary, run_dir)}."""
    cache = {}

    def get(engine: str):
        if engine not in cache:
            run_dir = tmp_path_factory.mktemp("reference") / engine
            launch = run_torchrun if engine == "ddp" else run  # users' launcher, and the raw environment
            cache[engine] = launch(2, overrides(engine), run_dir), run_dir
        return cache[engine]
    return get


@pytest.mark.parametrize("engine", ["fsdp", "zero1", "zero2", "zero3"])
def test_engines_follow_the_ddp_loss_curve(engine, reference):
    (summary, run_dir), (ddp, ddp_dir) = reference(engine), reference("ddp")
    assert summary["world"] == 2 and summary["step"] == STEPS and summary["finished"]
    losses, ddp_losses = train_losses(run_dir), train_losses(ddp_dir)
    assert len(losses) == len(ddp_losses) == STEPS
    np.testing.assert_allclose(losses, ddp_losses, rtol=1e-5)
    if engine in ("fsdp", "zero3"):  # frozen weights are sharded too: each rank holds about half
        held = [int(line.split("holds ")[1].split()[0]) for r in (0, 1)
                for line in (run_dir / "logs" / f"rank{r}.log").read_text().splitlines() if "this rank holds" in line]
        assert len(held) == 2 and sum(held) == pytest.approx(175_258, abs=1_000) and max(held) < 0.6 * 175_258
    # Distributed evaluation: 103 images over 2 ranks, each counted once.
    assert summary["final"]["count"] == ddp["final"]["count"] == 103
    assert summary["final"]["top1"] == pytest.approx(ddp["final"]["top1"])


@pytest.mark.parametrize("engine, extra", [("ddp", []), ("fsdp", ["dist.fsdp_unit=stage"]), ("zero3", [])])
def test_activation_checkpointing_follows_the_same_loss_curve(engine, extra, overrides, reference, tmp_path):
    """Every engine with stages recomputed in backward (lean autograd on, the bn default)."""
    summary = run(2, overrides(engine, "train.activation_checkpointing=[1,2,3]", *extra), tmp_path / "run")
    assert summary["finished"]
    np.testing.assert_allclose(train_losses(tmp_path / "run"), train_losses(reference("ddp")[1]), rtol=1e-5)
    if engine == "ddp":  # same bits: recomputation changes nothing
        assert summary["fingerprint"] == reference("ddp")[0]["fingerprint"]


def test_bf16_frozen_weights_shard_and_train_alike(overrides, tmp_path):
    """FSDP all-gathers frozen weights stored in bf16 (half the bytes) and matches DDP."""
    bf16 = ["train.precision=bf16", "train.frozen_dtype=bf16"]
    ddp = run(2, overrides("ddp", *bf16), tmp_path / "ddp")
    fsdp = run(2, overrides("fsdp", *bf16), tmp_path / "fsdp")
    assert ddp["finished"] and fsdp["finished"]
    np.testing.assert_allclose(train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "ddp"), rtol=1e-4)
    assert "frozen weights bf16" in (tmp_path / "fsdp" / "logs" / "rank0.log").read_text()


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero1", "zero3"])
def test_killing_one_rank_then_rerunning_ends_bit_identical(engine, overrides, reference, tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(2, overrides(engine), run_dir)
    launch.wait_for(lambda: 8 in committed_steps(run_dir))
    launch.kill(rank=1)
    codes = launch.wait(timeout=60)  # the survivor notices and exits on its own
    assert codes[0] != 0 and "lost contact with the other ranks" in launch.output(0)
    resumed = run(2, overrides(engine), run_dir)
    assert resumed["fingerprint"] == reference(engine)[0]["fingerprint"]
    assert "resumed from" in (run_dir / "logs" / "rank1.log").read_text()


def test_killing_all_ranks_at_any_moment_then_rerunning_ends_bit_identical(overrides, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides("ddp", "train.checkpoint_every=1")  # a save every step: kills land inside saves too
    def reached(target):
        return lambda: committed_steps(run_dir) and committed_steps(run_dir)[-1] >= target

    def saving(after):  # a save is under way: its temporary directory exists
        return lambda: reached(after)() and any((run_dir / "checkpoints").glob(".tmp-step_*"))

    for condition in (reached(3), saving(6), reached(11), saving(14)):
        launch = Launch(2, args, run_dir)
        launch.wait_for(condition, poll=0.001)
        launch.kill()
        launch.wait()
    resumed = run(2, args, run_dir)
    assert resumed["fingerprint"] == reference("ddp")[0]["fingerprint"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("sig, receiver", [(signal.SIGUSR2, 1), (signal.SIGTERM, 0)])
def test_a_stop_signal_to_one_rank_stops_all_at_the_same_step(sig, receiver, overrides, reference, tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(2, overrides("ddp", "train.stop_check_every=1"), run_dir, slurm=True)  # srun's variables this time
    launch.wait_for(lambda: (run_dir / "metrics.jsonl").is_file()
                    and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 5)
    launch.kill(rank=receiver, sig=sig)
    assert launch.wait(timeout=60) == [0, 0]
    logs = [(run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    stopped = [line for log in logs for line in log.splitlines() if "stopped at step" in line]
    steps = {line.split("stopped at step ")[1].split()[0] for line in stopped}
    assert len(stopped) == 2 and len(steps) == 1, stopped
    assert f"received {sig.name}" in logs[receiver] and "received" not in logs[1 - receiver]
    assert int(steps.pop()) == committed_steps(run_dir)[-1] < STEPS
    assert not (run_dir / "summary.json").exists()
    assert run(2, overrides("ddp"), run_dir)["fingerprint"] == reference("ddp")[0]["fingerprint"]


def test_a_hung_rank_makes_the_others_fail_within_the_timeout(overrides, tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(2, overrides("ddp", "dist.timeout_s=5", "optim.epochs=20"), run_dir)
    launch.wait_for(lambda: 4 in committed_steps(run_dir))
    launch.kill(rank=1, sig=signal.SIGSTOP)  # alive but silent
    start = time.monotonic()
    try:
        code = launch.procs[0].wait(timeout=60)
    finally:
        launch.kill(rank=1)
    assert code != 0 and time.monotonic() - start < 5 + 20
    assert "lost contact with the other ranks" in launch.output(0) and "Timed out" in launch.output(0)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_resume_on_fewer_and_more_ranks(engine, overrides, tmp_path):
    two = tmp_path / "two"
    at_12 = run(2, overrides(engine, "train.max_steps=12"), two)
    # A finished run is left alone, on any number of ranks...
    again = Launch(1, overrides(engine, "train.max_steps=12"), two)
    assert again.wait() == [0] and "nothing to do" in again.output(0)
    assert json.loads((two / "summary.json").read_text()) == at_12
    # ... its checkpoint loads on one rank and evaluates exactly as on two...
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "eval", str(two)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    row = json.loads((two / "eval.jsonl").read_text().splitlines()[-1])
    assert (row["top1"], row["top5"], row["count"]) == (at_12["final"]["top1"], at_12["final"]["top5"], 103)
    # ... and training goes on to the end there.
    one = Launch(1, overrides(engine), two)
    assert one.wait() == [0]
    assert "checkpoint written by 2 ranks, resuming on 1" in one.output(0)
    assert json.loads((two / "summary.json").read_text())["step"] == STEPS
    # 1 -> 2
    grow = tmp_path / "grow"
    run(1, overrides(engine, "train.max_steps=8"), grow)
    launch = Launch(2, overrides(engine), grow)
    assert launch.wait() == [0, 0]
    assert "checkpoint written by 1 ranks, resuming on 2" in launch.output(0)
    summary = json.loads((grow / "summary.json").read_text())
    assert summary["finished"] and summary["world"] == 2 and summary["final"]["count"] == 103


def test_fsdp_checkpoint_reshards_optimizer_state_exactly(overrides, reference, tmp_path):
    """Load a 2-rank FSDP checkpoint into one process: every saved tensor comes back bit for bit."""
    _, run_dir = reference("fsdp")
    path = checkpoint.latest(run_dir)
    dcp_to_torch_save(path / "state", tmp_path / "full.pt")
    saved = torch.load(tmp_path / "full.pt", weights_only=False)
    cfg = config.load("configs/cifar10_resnet14.yaml", overrides("fsdp"))
    model = models.build(cfg.model.arch, 10, cfg.seed, cfg.model.bn_init)
    masks = modes.apply(model, cfg.mode, cfg.seed)
    cpu = torch.device("cpu")
    engine = engines.wrap(cfg, plan.resolve(cfg, cpu, memory=memory), model, masks, Context(0, 1, 0, cpu))
    checkpoint.load(path, engine, 0, 1, checkpoint.frozen_digest(model))
    state = model.state_dict()
    assert saved["model"].keys() == {k for k in state if k not in engine.frozen_names}
    for name, tensor in saved["model"].items():
        assert torch.equal(state[name], tensor), name
    momentum = engine.optimizer.state_dict()["state"]
    saved_momentum = [saved["optim"]["state"][name]["momentum_buffer"] for name in engine.bn_names]
    assert len(momentum) == len(saved_momentum) > 0
    for i, tensor in enumerate(saved_momentum):
        assert torch.equal(momentum[i]["momentum_buffer"], tensor)


def test_deepspeed_resumes_only_at_its_world_size(overrides, tmp_path):
    run_dir = tmp_path / "run"
    run(2, overrides("zero1", "train.max_steps=4"), run_dir)
    launch = Launch(1, overrides("zero1"), run_dir)
    assert launch.wait() == [2]  # a setup error: never retried
    assert "resumes only at the same world size; run it with 2 ranks" in launch.output(0)


def test_dali_imagenet_on_two_ranks_resumes_bit_identical(imagenet_root, tmp_path):
    """Each rank restores its own DALI state: the augmentations after the kill are the ones it would have drawn."""
    args = [f"data.root={imagenet_root}", "model.arch=imagenet_resnet_18_8", "data.batch_size=8", "train.bn_batch=8",
            "data.eval_batch_size=6", "data.image_size=32", "data.resize_size=40", "data.num_threads=1",
            "optim.epochs=2", "train.device=cpu", "train.deterministic=true", "train.checkpoint_every=3",
            "train.progress=lines"]
    config = "configs/imagenet_resnet18.yaml"
    whole = run(2, args, tmp_path / "whole", config=config)
    assert whole["final"]["count"] == 20
    run_dir = tmp_path / "run"
    run(2, [*args, "train.max_steps=6"], run_dir, config=config)  # stops mid-epoch 1 (4 steps per epoch)
    assert run(2, args, run_dir, config=config)["fingerprint"] == whole["fingerprint"]


def test_fsdp_bf16_gathers_in_bf16_and_follows_ddp(overrides, tmp_path):
    """The GPU defaults (bf16, channels_last) with fp32 frozen weights: FSDP's mixed-precision
    policy gathers convolution weights in bf16 and keeps BN in fp32, which is what autocast
    computes under DDP; its weights go back to NCHW (fully_shard refuses channels_last ones)."""
    gpu_like = ["train.precision=bf16", "train.channels_last=true", "train.frozen_dtype=fp32"]
    ddp = run(2, overrides("ddp", *gpu_like), tmp_path / "ddp")
    fsdp = run(2, overrides("fsdp", *gpu_like), tmp_path / "fsdp")
    assert ddp["finished"] and fsdp["finished"]
    np.testing.assert_allclose(train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "ddp"), rtol=1e-4)


def test_deepspeed_runs_as_one_process_without_a_launcher(overrides, tmp_path):
    """No RANK or LOCAL_RANK at all: DeepSpeed is given LOCAL_RANK by the engine; the GPU
    defaults (bf16, channels_last weights, which DeepSpeed broadcasts as flat bytes) run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    args = overrides("zero3", "train.max_steps=4", "train.precision=bf16", "train.channels_last=true")
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "train", "configs/cifar10_resnet14.yaml", *args,
                           "--run-dir", str(tmp_path / "run")],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["step"] == 4 and summary["world"] == 1
