"""CPU proofs of the GPU-path fixes: device mapping under Slurm and torchrun, DeepSpeed's
autocast, FSDP's mixed precision, the CUDA/NCCL environment, the CIFAR loader's pixels
and host copies, evaluation without boolean indexing, DALI layout and pipeline reuse."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bnonly_dist import config, dist, engines, models, modes, network
from bnonly_dist.config import plan as plan_mod
from bnonly_dist.data import sharding
from bnonly_dist.data.cifar import CifarSource, augment
from bnonly_dist.data.dali import DaliImageNetSource
from bnonly_dist.engines import ddp
from bnonly_dist.models import memory
from bnonly_dist.models.init import name_seed
from bnonly_dist.run.evaluate import evaluate

CPU = torch.device("cpu")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUBLAS_WORKSPACE_CONFIG",
               "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")


class Ops(TorchDispatchMode):
    """Records every aten op with the devices of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls, self.dtypes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {a.device.type for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        self.calls.append((str(func), devices))
        if args and isinstance(args[0], torch.Tensor):
            self.dtypes.append((str(func), args[0].dtype))
        return func(*args, **kwargs)


@pytest.fixture
def clean_env(monkeypatch):
    """The launcher's and CUDA's variables absent, and restored after the test."""
    for key in [k for k in os.environ if k.startswith("SLURM_")] + list(LAUNCH_VARS):
        monkeypatch.setenv(key, "")  # recorded as it was, so what dist.init writes is undone too
        monkeypatch.delenv(key)
    return monkeypatch


def fake_gpus(monkeypatch, count: int) -> list[int]:
    """count visible CUDA devices; returns the list set_device is called with."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


# --- 1. device mapping ---------------------------------------------------------------------
LAUNCHES = {  # name: (environment, visible GPUs, the GPU index this process must use)
    "srun --gpus-per-task 1": ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "7",
                                "SLURM_JOB_NODELIST": "gpu[01-02]"}, 1, 0),
    "srun, all GPUs visible": ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "7",
                                "SLURM_JOB_NODELIST": "gpu[01-02]"}, 4, 3),
    "torchrun, all GPUs visible": ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "MASTER_ADDR": "gpu01",
                                    "MASTER_PORT": "29500"}, 8, 5),
    "torchrun, 1 GPU visible": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01",
                                 "MASTER_PORT": "29500"}, 1, 0),
}


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_every_library_gets_the_chosen_gpu(launch, clean_env):
    env, count, index = LAUNCHES[launch]
    for key, value in env.items():
        clean_env.setenv(key, value)
    chosen = fake_gpus(clean_env, count)
    calls = {}
    clean_env.setattr(dist.torch_dist, "is_initialized", lambda: False)
    clean_env.setattr(dist.torch_dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    clean_env.setattr(dist.torch_dist, "new_group", lambda **kw: None)
    ctx = dist.init("auto", 30)
    assert ctx.device == torch.device("cuda", index) and chosen == [index]
    assert calls["backend"] == "nccl" and calls["device_id"] == torch.device("cuda", index)
    assert os.environ["LOCAL_RANK"] == str(index)  # what DeepSpeed's set_device reads
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def small_cfg(*overrides):
    return config.load("configs/cifar10_resnet14.yaml", ["data.name=synthetic", "data.batch_size=8", "train.bn_batch=8",
                                                          "train.device=cpu", *overrides])


def test_ddp_is_given_the_device_index_not_the_local_rank(monkeypatch):
    seen = {}
    monkeypatch.setattr("bnonly_dist.engines.ddp.DistributedDataParallel",
                        lambda model, device_ids, **options: seen.update(device_ids=device_ids, **options) or model)
    cfg = small_cfg()
    model = models.build(cfg.model.arch, 10, 0, cfg.model.bn_init)
    masks = modes.apply(model, "bn", 0)
    ctx = dist.Context(rank=5, world=8, local_rank=3, device=torch.device("cuda", 0))  # srun --gpus-per-task 1
    engines.wrap(cfg, plan_mod.resolve(cfg, CPU, memory=memory), model, masks, ctx)
    assert seen["device_ids"] == [0]
    # each rank's BN running statistics are its own groups': never broadcast in forward
    assert seen == {"device_ids": [0], **ddp.NO_FORWARD_BUFFER_SYNC} and False in ddp.NO_FORWARD_BUFFER_SYNC.values()


class Started(Exception):
    pass


@pytest.mark.parametrize("precision, enabled", [("bf16", True), ("fp32", False)])
def test_deepspeed_starts_on_the_chosen_gpu_with_the_plans_autocast(precision, enabled, clean_env):
    deepspeed = pytest.importorskip("deepspeed")
    seen = {}

    def initialize(model, optimizer, config):
        seen.update(local_rank=os.environ.get("LOCAL_RANK"), config=config)
        raise Started

    clean_env.setattr(deepspeed, "initialize", initialize)
    clean_env.setattr(torch.distributed, "is_initialized", lambda: True)
    cfg = small_cfg("dist.engine=deepspeed", f"train.precision={precision}")
    model = models.build(cfg.model.arch, 10, 0, cfg.model.bn_init)
    ctx = dist.Context(rank=5, world=8, local_rank=3, device=torch.device("cuda", 0))
    with pytest.raises(Started):
        engines.wrap(cfg, plan_mod.resolve(cfg, CPU, memory=memory), model, modes.apply(model, "bn", 0), ctx)
    assert seen["local_rank"] == "0"
    assert seen["config"]["torch_autocast"] == {"enabled": enabled, "dtype": "bfloat16",
                                                "lower_precision_safe_modules": []}
    assert seen["config"]["train_micro_batch_size_per_gpu"] == 1


DEEPSPEED_CONV_DTYPE = """
import sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from bnonly_dist import config, dist, engines, network
from bnonly_dist.config import plan as plan_mod
from bnonly_dist.engines import deepspeed as ds_engine
from bnonly_dist.models import memory

class Convs(TorchDispatchMode):  # the dtype each convolution kernel computes in (after autocast)
    seen = set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("aten.convolution."):
            self.seen.add(str(args[0].dtype))
        return func(*args, **(kwargs or {}))

# DeepSpeed now sees the loop's autocast as it does on a GPU (torch.is_autocast_enabled()
# without a device asks about CUDA), where it switches an outer autocast off unless its own
# torch_autocast section is configured.
is_enabled = torch.is_autocast_enabled
torch.is_autocast_enabled = lambda device_type="cpu": is_enabled(device_type)
if sys.argv[1] == "unconfigured":  # what the engine did before: no torch_autocast section
    make = ds_engine.ds_config
    ds_engine.ds_config = lambda *a: {k: v for k, v in make(*a).items() if k != "torch_autocast"}
cfg = config.load("configs/cifar10_resnet14.yaml", ["data.name=synthetic", "data.batch_size=8", "train.bn_batch=8",
                                                    "train.device=cpu",
                                                    "dist.engine=deepspeed", "train.precision=bf16",
                                                    "train.frozen_dtype=fp32"])
plan = plan_mod.resolve(cfg, torch.device("cpu"), memory=memory)
net = network.build(cfg, plan, 10)
engine = engines.wrap(cfg, plan, net.model, net.masks, dist.Context(0, 1, 0, torch.device("cpu")))
with Convs():
    engine.train_step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), plan.autocast)
print("conv dtypes", sorted(Convs.seen))
"""


@pytest.mark.parametrize("configured", ["configured", "unconfigured"])
def test_deepspeed_convolutions_see_bf16_in_a_single_process(configured):
    """One process started without a launcher (no LOCAL_RANK), as `bnonly train` on one GPU."""
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_CONV_DTYPE, configured], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dtype = "torch.bfloat16" if configured == "configured" else "torch.float32"
    assert f"conv dtypes ['{dtype}']" in proc.stdout


# --- 2. FSDP mixed precision ---------------------------------------------------------------
def test_fsdp_gathers_conv_weights_in_bf16_and_keeps_bn_fp32():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from bnonly_dist.engines.fsdp import shard, shard_units
    cfg = small_cfg("train.precision=bf16", "train.frozen_dtype=fp32")  # stored fp32, gathered bf16
    plan = plan_mod.resolve(cfg, CPU, memory=memory)
    model = network.build(cfg, plan, 10).model
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        shard(model, shard_units(model, "block"), init_device_mesh("cpu", (1,)), bf16=True)
        seen = {}
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)):
                module.register_forward_pre_hook(lambda m, a, name=name: seen.update({name: m.weight.dtype}))
        with plan.autocast():
            model(torch.randn(4, 3, 32, 32))
        for module in model.modules():  # the root keeps its gathered parameters after a forward
            if isinstance(module, FSDPModule):
                module.reshard()
    finally:
        dist.teardown()
    assert len(seen) == 2 + 4 * 6 + 2 * 2 + 1  # ResNet-14: stem conv+BN, 6 blocks, 2 projections, head
    for name, dtype in seen.items():
        module = model.get_submodule(name)
        assert dtype == (torch.float32 if isinstance(module, torch.nn.BatchNorm2d) else torch.bfloat16), name
    # the stored (sharded) parameters stay fp32: the optimizer steps in full precision
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --- 3. CUDA and NCCL environment ----------------------------------------------------------
def test_cublas_workspace_is_set_for_deterministic_runs_only():
    env = {}
    dist.prepare_environment(False, env)
    assert "CUBLAS_WORKSPACE_CONFIG" not in env
    dist.prepare_environment(True, env)
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    mine = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    dist.prepare_environment(True, mine)
    assert mine["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # a user's choice stays


def test_init_sets_cublas_before_choosing_the_device(clean_env):
    seen = []
    clean_env.setattr(dist, "choose_device", lambda pref, rank: seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
                      or CPU)
    dist.init("cpu", deterministic=True)
    assert seen == [":4096:8"]


@pytest.mark.parametrize("given, expected", [(None, "3"), ("0", "3"), ("1", "1"), ("2", "2")])
def test_nccl_errors_never_leave_a_rank_waiting(given, expected):
    env = {} if given is None else {"TORCH_NCCL_ASYNC_ERROR_HANDLING": given}
    dist.prepare_environment(False, env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == expected


@pytest.mark.parametrize("err, lost", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"), True),
    (RuntimeError("NCCL communicator was aborted on rank 0."), True),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error"), True),
    (RuntimeError("[PG 0 Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)"), True),
    (torch.distributed.DistBackendError("ncclRemoteError"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
])
def test_lost_contact_knows_nccl_and_gloo(err, lost):
    assert dist.lost_contact(err) is lost


# --- 4. CIFAR loader -----------------------------------------------------------------------
def reference_epoch(source: CifarSource, epoch: int, start_step: int):
    """The per-step loader as it was before the epoch-at-once rewrite (the reference)."""
    perm = sharding.epoch_permutation(len(source.train_labels), source.seed, epoch)
    indices = sharding.rank_train_indices(perm, source.global_batch, source.rank, source.world, start_step)
    lo, hi = source.rank * source.local_batch, (source.rank + 1) * source.local_batch
    for i, step in enumerate(range(start_step, source.steps_per_epoch)):
        generator = torch.Generator().manual_seed(name_seed(source.seed, f"cifar/augment/{epoch}/{step}"))
        offsets = torch.randint(0, 9, (source.global_batch, 2), generator=generator)[lo:hi]
        flips = (torch.rand(source.global_batch, generator=generator) < 0.5)[lo:hi]
        idx = torch.from_numpy(indices[i * source.local_batch:(i + 1) * source.local_batch]).to(source.device)
        images = augment(source.train_images[idx], offsets.to(source.device), flips.to(source.device))
        yield source._normalize(images), source.train_labels[idx]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("start_step", [0, 3, 9, 10])
def test_cifar_pixels_are_those_of_the_per_step_loader(cifar_root, world, start_step):
    for rank in {0, world - 1}:
        source = CifarSource(str(cifar_root), 32, 50, rank, world, seed=3, device=CPU)
        for epoch in (0, 2):
            new, old = list(source.train_epoch(epoch, start_step)), list(reference_epoch(source, epoch, start_step))
            assert len(new) == len(old) == source.steps_per_epoch - start_step
            for (a, y), (b, z) in zip(new, old):
                assert torch.equal(a, b) and torch.equal(y, z)


def test_cifar_steps_copy_nothing_from_the_host(cifar_root):
    """On the meta device any host tensor a step used would show up as a CPU argument."""
    source = CifarSource(str(cifar_root), 32, 50, 1, 2, seed=0, device=torch.device("meta"))
    batches = source.train_epoch(1, 2)
    next(batches)  # the epoch's one copy happens here
    with Ops() as ops:
        for _ in range(4):
            images, labels = next(batches)
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    assert ops.calls and not [name for name, devices in ops.calls if "cpu" in devices]


# --- 5. evaluation -------------------------------------------------------------------------
def test_evaluation_uses_no_boolean_indexing():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    images = torch.randn(10, 3, 2, 2)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1, -1, 2])
    with Ops() as ops:
        result = evaluate(model, [(images, labels)], CPU)
    assert not [name for name, _ in ops.calls if "nonzero" in name or "masked_select" in name]
    logits, valid = model(images), labels >= 0
    assert result["count"] == 8
    assert result["loss"] == pytest.approx(F.cross_entropy(logits[valid], labels[valid]).item(), rel=1e-6)
    assert result["top1"] == pytest.approx(100 * (logits[valid].argmax(1) == labels[valid]).float().mean().item())


# --- 6. DALI -------------------------------------------------------------------------------
def dali(root, channels_last=False):
    pytest.importorskip("nvidia.dali")
    return DaliImageNetSource(str(root), 8, 6, 0, 1, seed=0, device=CPU, decode="cpu", num_threads=1, image_size=32,
                              resize_size=40, min_area=0.1, channels_last=channels_last)


def test_dali_hands_out_channels_last_without_a_copy(imagenet_root):
    plain, nhwc = dali(imagenet_root), dali(imagenet_root, channels_last=True)
    for (a, y), (b, z) in zip(plain.train_epoch(0), nhwc.train_epoch(0)):
        assert b.shape == a.shape == (8, 3, 32, 32) and b.is_contiguous(memory_format=torch.channels_last)
        assert b.contiguous(memory_format=torch.channels_last).data_ptr() == b.data_ptr()  # what the loop does
        assert torch.equal(a, b) and torch.equal(y, z)
    evals = [list(s.eval_batches()) for s in (plain, nhwc)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*evals))


def test_dali_builds_the_eval_pipeline_once(imagenet_root):
    source = dali(imagenet_root, channels_last=True)
    first = list(source.eval_batches())
    list(source.train_epoch(0))
    second = list(source.eval_batches())
    assert source.eval_pipelines_built == 1
    assert len(first) == len(second) == 4  # 20 images, batches of 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    half = source.eval_batches()
    next(half)  # a pass left half way cannot be rewound: the next pass builds afresh
    half.close()
    third = list(source.eval_batches())
    assert source.eval_pipelines_built == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, third))
