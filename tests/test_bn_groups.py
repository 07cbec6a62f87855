"""BN statistics over a fixed number of images (train.bn_batch): the same experiment on any world size.

Unit: grouped ("ghost") and synchronised BN equal one BatchNorm over the same n images in
float64 (1e-9), forward, backward and running statistics, in both autograd paths and in
channels_last. End to end: the same config on 1, 2 and 4 processes logs the same loss at
every step and ends with the same model. The tolerance (rtol 2e-5 on losses, atol 5e-4 on
BN parameters and running statistics after 10 SGD steps) covers float32 sums taken in
another order (nn.BatchNorm2d's kernel against grouped sums, per-rank partial sums,
gloo's reduction order), which SGD amplifies step by step (measured: 2e-6 and 6e-5);
with train.bn_batch=null the losses differ by more than 100x that from the first step.
On a GPU (cuda tests): ghost groups and a synchronised group over one NCCL rank (nn.SyncBatchNorm's
kernels) against nn.BatchNorm2d in bf16 and channels_last, refusing any wait for the device.
"""
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from launch import free_port, run, train_losses
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bnonly_dist.config import ConfigError, plan
from bnonly_dist.models import layers, memory
from bnonly_dist.config.plan import BNGroups
from bnonly_dist.models.bn_groups import average_running_statistics

C, H, W = 3, 4, 5
LOSS_RTOL, STATE_ATOL = 2e-5, 5e-4


def reference_bn(x, weight, bias, n, relu):
    """nn.BatchNorm2d's own training forward, group by group of n consecutive images (float64)."""
    running_mean, running_var = torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype)
    outs, means, variances = [], [], []
    for start in range(0, x.shape[0], n):
        part = x[start:start + n]
        rm, rv = torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype)
        out = F.batch_norm(part, rm, rv, weight, bias, True, 0.1, 1e-5)
        outs.append(F.relu(out) if relu else out)
        means.append(rm)
        variances.append(rv)
    running_mean = torch.stack(means).mean(0)  # each group's update, averaged over the groups
    running_var = torch.stack(variances).mean(0)
    return torch.cat(outs), running_mean, running_var


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, H, W, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    grad = torch.randn(batch, C, H, W, generator=g, dtype=torch.float64)
    return x, weight, bias, grad


def layer(weight, bias, lean, per_rank, group=None):
    bn = layers.BatchNorm2d(C).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    bn.lean = lean
    layers.set_bn_groups(bn, per_rank, group)
    return bn


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_ghost_groups_equal_one_batchnorm_per_group(lean, channels_last, relu):
    x, weight, bias, grad = inputs(12)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = x.clone().contiguous(memory_format=fmt).requires_grad_()
    bn = layer(weight, bias, lean, per_rank=3)
    out = bn(ours, relu=relu)
    (out * grad).sum().backward()
    theirs = x.clone().requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    expected, running_mean, running_var = reference_bn(theirs, w, b, 4, relu)
    (expected * grad).sum().backward()
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(bn.weight.grad, w.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(bn.bias.grad, b.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(bn.running_mean, running_mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(bn.running_var, running_var, rtol=0, atol=1e-9)


def test_a_checkpointed_recompute_updates_no_running_statistic():
    x, weight, bias, _ = inputs(8)
    bn = layer(weight, bias, lean=True, per_rank=2)
    with layers._recomputing():
        bn(x.clone().requires_grad_())
    assert torch.equal(bn.running_mean, torch.zeros(C, dtype=torch.float64))
    assert torch.equal(bn.running_var, torch.ones(C, dtype=torch.float64))


def test_bf16_autocast_keeps_statistics_in_fp32():
    x, weight, bias, _ = inputs(8)
    bn = layers.BatchNorm2d(C)
    layers.set_bn_groups(bn, 2, None)
    with torch.autocast("cpu", torch.bfloat16):
        out = bn(x.float().to(torch.bfloat16))
    expected, running_mean, _ = reference_bn(x, torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64),
                                             4, relu=False)
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.05)  # bf16 output: 8 bits of mantissa
    torch.testing.assert_close(bn.running_mean.double(), running_mean, rtol=0, atol=1e-2)


CASES = [(2, False, False), (2, True, True), (4, True, False), (4, False, True)]  # ranks per group, lean, NHWC


def _synchronised(rank, world, port):
    """One rank of `world` with 2 images, checked against the reference in every case of CASES."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from bnonly_dist import dist
        for ranks_per_group, lean, channels_last in CASES:
            _check_synchronised(rank, world, dist.bn_group(ranks_per_group, 30), ranks_per_group, lean, channels_last)
    finally:
        dist.teardown()


def _check_synchronised(rank, world, group, ranks_per_group, lean, channels_last):
    x, weight, bias, grad = inputs(2 * world)
    mine = slice(2 * rank, 2 * rank + 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = x[mine].clone().contiguous(memory_format=fmt).requires_grad_()
    bn = layer(weight, bias, lean, per_rank=1, group=group)
    out = bn(ours, relu=True)
    (out * grad[mine]).sum().backward()
    theirs = x.clone().requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    expected, running_mean, running_var = reference_bn(theirs, w, b, 2 * ranks_per_group, relu=True)
    (expected * grad).sum().backward()
    torch.testing.assert_close(out, expected[mine], rtol=0, atol=1e-9)
    torch.testing.assert_close(ours.grad, theirs.grad[mine], rtol=0, atol=1e-9)
    # The affine gradients are this rank's part; DDP's all-reduce adds the parts.
    weight_grad = bn.weight.grad.clone()
    torch.distributed.all_reduce(weight_grad)
    torch.testing.assert_close(weight_grad, w.grad, rtol=0, atol=1e-9)
    average_running_statistics(bn)  # what evaluations and checkpoints see
    torch.testing.assert_close(bn.running_mean, running_mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(bn.running_var, running_var, rtol=0, atol=1e-9)


def test_synchronised_groups_equal_one_batchnorm_over_their_ranks():
    """4 ranks of 2 images: groups of 2 and of 4 ranks, plain and lean, NCHW and NHWC (one spawn: start-up is slow)."""
    mp.spawn(_synchronised, args=(4, free_port()), nprocs=4)


@pytest.mark.parametrize("bn_batch, world, expected", [
    (None, 4, BNGroups(None)), (32, 1, BNGroups(32)), (8, 1, BNGroups(8, per_rank=4)),
    (8, 2, BNGroups(8, per_rank=2)), (16, 4, BNGroups(16, ranks=2)), (32, 4, BNGroups(32, ranks=4))])
def test_the_grouping_follows_the_world(bn_batch, world, expected):
    assert plan.bn_groups(bn_batch, 32, world) == expected


def test_the_plan_line_says_when_a_group_spans_nodes(monkeypatch, tiny_cfg):
    """Ranks per node as torchrun or Slurm state them; nothing said where the launcher states none."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    cfg = tiny_cfg()  # batch 32, bn_batch 32: on 4 ranks one group of 4

    def line():
        return plan.resolve(cfg, torch.device("cpu"), 4, memory=memory).describe()
    assert "synchronised over 4 ranks" in line() and "across nodes" not in line()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert "across nodes" not in line()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert "synchronised over 4 ranks across nodes (2 ranks per node)" in line()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "3(x2)")  # 4 does not divide 3: some groups straddle two nodes
    assert "across nodes (3 ranks per node)" in line()
    assert "across nodes" not in BNGroups(8, per_rank=4).describe(32, 1)


@pytest.mark.parametrize("bn_batch, world, works", [(12, 1, "[1, 2, 4, 8, 16, 32]"), (64, 2, "[1, 2, 4, 8, 16, 32]"),
                                                    (24, 4, "[1, 2, 4, 8, 16, 32]")])
def test_impossible_groupings_name_what_works(bn_batch, world, works):
    with pytest.raises(ConfigError) as err:
        plan.bn_groups(bn_batch, 32, world)
    assert str(err.value).startswith(f"train.bn_batch={bn_batch} cannot be formed from the global batch 32 on {world} rank")
    assert f"use one of {works}" in str(err.value)


def test_an_impossible_grouping_stops_before_anything_is_written(tmp_path, cifar_root):
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "train", "configs/cifar10_resnet14.yaml",
                           f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=12", "train.device=cpu",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "train.bn_batch=12" in proc.stderr
    assert not (tmp_path / "run").exists()


# --- end to end: 1, 2 and 4 processes ------------------------------------------------------------
def overrides(cifar_root, *extra):
    return [f"data.root={cifar_root}", "data.batch_size=32", "data.eval_batch_size=50", "optim.epochs=1",
            "optim.milestones=[1]", "train.device=cpu", "train.deterministic=true", "train.log_every=1",
            "train.checkpoint_every=5", "train.progress=lines", "dist.timeout_s=60", "model.arch=cifar_resnet_8",
            "train.channels_last=false", "optim.lr=0.02", *extra]


def final_state(run_dir):
    """The final checkpoint's model state (the world's mean running statistics)."""
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    out = run_dir / "final.pt"
    dcp_to_torch_save(newest / "state", out)
    return torch.load(out, weights_only=False)["model"]


def assert_same_run(a, b):
    np.testing.assert_allclose(train_losses(b), train_losses(a), rtol=LOSS_RTOL)
    state_a, state_b = final_state(a), final_state(b)
    for key in state_a:
        if "bn" in key or "running" in key:
            difference = (state_b[key].float() - state_a[key].float()).abs().max().item()
            assert difference <= STATE_ATOL, f"{key}: {difference}"
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert summary_b["final"]["loss"] == pytest.approx(summary_a["final"]["loss"], rel=LOSS_RTOL)


@pytest.fixture(scope="module")
def worlds(cifar_root, tmp_path_factory):
    """bn_batch=16 on 1 (2 groups per rank), 2 (one per rank) and 4 processes (synchronised over 2)."""
    root = tmp_path_factory.mktemp("worlds")
    for world in (1, 2, 4):
        run(world, overrides(cifar_root, "train.bn_batch=16"), root / f"w{world}")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_the_world_size_does_not_change_the_run(worlds, world):
    assert_same_run(worlds / "w1", worlds / f"w{world}")


@pytest.mark.slow
def test_per_rank_statistics_change_with_the_world(worlds, cifar_root, tmp_path):
    """train.bn_batch=null (each rank's own batch): the same comparison fails, so the test above can tell."""
    run(1, overrides(cifar_root, "train.bn_batch=null", "train.max_steps=1"), tmp_path / "w1")
    run(4, overrides(cifar_root, "train.bn_batch=null", "train.max_steps=1"), tmp_path / "w4")
    one, four = np.array(train_losses(tmp_path / "w1")), np.array(train_losses(tmp_path / "w4"))
    assert np.abs(four[0] - one[0]) / one[0] > 100 * LOSS_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_a_run_resumed_on_another_world_ends_like_the_uninterrupted_one(worlds, cifar_root, tmp_path, world):
    run_dir = tmp_path / "run"
    run(2, overrides(cifar_root, "train.bn_batch=16", "train.max_steps=5"), run_dir)  # stops with a checkpoint at 5
    run(world, overrides(cifar_root, "train.bn_batch=16"), run_dir)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "checkpoint written by 2 ranks, resuming on" in log and "WARNING" not in log
    assert_same_run(worlds / "w2", run_dir)


# --- on a GPU: ghost groups and synchronised groups (nn.SyncBatchNorm's kernels, NCCL) ------------
@contextlib.contextmanager
def no_device_waits():
    """Inside: any wait of the host for the GPU raises (torch.cuda.set_sync_debug_mode)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _bf16_pair(seed: int = 0, layout=torch.channels_last):
    """Inputs on the GPU in layout: x (bf16 values), its output gradient, and BN affine parameters."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(16, 8, 6, 5, generator=g) * 3 + 1).to(torch.bfloat16)
    grad = torch.randn(16, 8, 6, 5, generator=g).to(torch.bfloat16)
    weight, bias = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    return [t.cuda().contiguous(memory_format=layout) if t.dim() == 4 else t.cuda()
            for t in (x, grad, weight, bias)]


def _train_step(bn, x, grad):
    """bn's forward and backward under bf16 autocast: (output, input gradient)."""
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):
        out = bn(x)
    out.backward(grad)
    return out, x.grad


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_a_synchronised_group_of_one_rank_equals_native_batchnorm():
    """The synchronised path over a one-rank NCCL group (SyncBatchNorm's kernels and collectives) against
    nn.BatchNorm2d, bf16 autocast, channels_last: output, input and affine gradients, running statistics; the
    second step under set_sync_debug_mode("error"), which fails on any wait for the GPU."""
    device = torch.device("cuda", torch.cuda.current_device())
    # A store in memory: one rank needs no port, and nothing outside this process can take it.
    torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(), rank=0, world_size=1,
                                         device_id=device)
    try:
        group = torch.distributed.new_group([0])  # as dist.bn_group makes a BN group of its own
        x, grad, weight, bias = _bf16_pair()
        ours, native = layers.BatchNorm2d(8).cuda(), torch.nn.BatchNorm2d(8).cuda()
        for bn in (ours, native):
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
        layers.set_bn_groups(ours, 1, group)
        for step in range(2):
            expected, expected_grad = _train_step(native, x, grad)
            with no_device_waits() if step else contextlib.nullcontext():
                out, x_grad = _train_step(ours, x, grad)
            assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(x_grad.float(), expected_grad.float(), rtol=2e-2, atol=2e-2)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(ours, name).grad, getattr(native, name).grad, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(ours.running_mean, native.running_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_var, native.running_var, rtol=1e-4, atol=1e-4)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_on_the_gpu_ghost_groups_equal_native_batchnorm_per_group(layout):
    """4 ghost groups in bf16 against nn.BatchNorm2d on each group, forward and backward, running statistics,
    in channels_last and NCHW, the second step under set_sync_debug_mode("error")."""
    x, grad, weight, bias = _bf16_pair(1, layout)
    ours = layers.BatchNorm2d(8).cuda()
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.bias.copy_(bias)
    layers.set_bn_groups(ours, 4, None)
    expected, expected_grad, weight_grad = [], [], torch.zeros(8, device=x.device)
    bias_grad = torch.zeros(8, device=x.device)
    running_mean, running_var = torch.zeros(8, device=x.device), torch.ones(8, device=x.device)
    for part in range(4):  # the reference: one native BN per group of 4 images, in fp32
        xs = x[4 * part:4 * part + 4].float().requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        mean, var = torch.zeros(8, device=x.device), torch.ones(8, device=x.device)
        out = F.batch_norm(xs, mean, var, w, b, True, 1.0, 1e-5)  # momentum 1: this group's own statistics
        out.backward(grad[4 * part:4 * part + 4].float())
        expected.append(out.detach())
        expected_grad.append(xs.grad)
        weight_grad += w.grad
        bias_grad += b.grad
        running_mean += mean / 4  # the groups' mean of their means and unbiased variances
        running_var += var / 4
    running_var -= 1
    for step in range(2):
        ours.weight.grad = ours.bias.grad = None
        with no_device_waits() if step else contextlib.nullcontext():
            out, x_grad = _train_step(ours, x, grad)
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=layout)
        assert x_grad.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out.float(), torch.cat(expected), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(x_grad.float(), torch.cat(expected_grad), rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(ours.weight.grad, weight_grad, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(ours.bias.grad, bias_grad, rtol=1e-2, atol=1e-2)
    # two steps on the same images with momentum 0.1: each group's kernel took its share (_group_momentum)
    kept = 0.9 ** 2
    torch.testing.assert_close(ours.running_mean, (1 - kept) * running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.running_var, kept + (1 - kept) * running_var, rtol=1e-3, atol=1e-3)


def test_a_group_of_one_value_per_channel_is_refused_as_native_batchnorm_refuses_it():
    """One image per group at a 1x1 layer: no variance (the kernel's unbiased one would divide by zero)."""
    bn = layers.BatchNorm2d(C)
    layers.set_bn_groups(bn, 4, None)
    with pytest.raises(ValueError, match="1 value per channel at this 1x1 layer.*larger train.bn_batch"):
        bn(torch.randn(4, C, 1, 1, requires_grad=True))
    assert torch.equal(bn.running_var, torch.ones(C))  # nothing updated
    bn(torch.randn(8, C, 1, 1, requires_grad=True))  # two images per group: fine


def test_the_all_gather_falls_back_to_the_name_older_torch_has(monkeypatch):
    """A torch before 2.12 (the GPU nodes' 2.11) has no torch.distributed.all_gather_single: the module then
    gathers with all_gather_into_tensor (its import re-run under such a torch), and no module calls either
    name but through bn_groups.all_gather_single."""
    import importlib.util
    from pathlib import Path
    monkeypatch.delattr(torch.distributed, "all_gather_single", raising=False)  # 2.11 has none to take
    spec = importlib.util.find_spec("bnonly_dist.models.bn_groups")
    older = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(older)
    assert older.all_gather_single is torch.distributed.all_gather_into_tensor
    package = Path(spec.origin).parents[1]
    direct = [str(p) for p in package.rglob("*.py") for line in p.read_text().splitlines()
              if ("all_gather_single(" in line or "all_gather_into_tensor(" in line) and "dist." in line]
    assert direct == []


def test_the_bench_takes_the_peak_of_a_step_not_its_end():
    """perf/bench_bn's peak memory of a step on the CPU (torch.profiler's allocations and frees, in order)."""
    from bnonly_dist.perf.bench_bn import step_peak_bytes
    kept = []

    def step():
        a = torch.ones(2**20)  # 4 MiB held while 2 more are made and freed
        kept.append(torch.ones(2**19))
        del a

    peak = step_peak_bytes(step, torch.device("cpu"))
    assert 6 * 2**20 <= peak < 6 * 2**20 + 2**16
