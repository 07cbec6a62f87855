"""GPU tests (`pytest -m cuda`): each skips without CUDA and runs on any one GPU.

`python -m bnonly_dist.gpu_check` runs them on a GPU node and writes the report. Its CPU
rehearsal (`--rehearse`, run by tests/test_gpu_check.py) runs them with
BNONLY_TEST_DEVICE=cpu at tiny sizes: every assertion that needs no GPU (the plan's choices,
the training loop, the engines over gloo, resume) then fails in CI rather than on the GPU
node; the few that need CUDA itself (DeepSpeed's accelerator, nvJPEG) skip there."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from bnonly_dist import config, dist, engines, models, modes, network
from bnonly_dist.config import plan as plan_mod
from bnonly_dist.data import fake
from bnonly_dist.models import memory
from bnonly_dist.run import train

GPU = torch.device("cpu") if os.environ.get("BNONLY_TEST_DEVICE") == "cpu" else torch.device("cuda", 0)
ON_CPU = GPU.type == "cpu"  # the rehearsal: tiny sizes
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_cuda = pytest.mark.skipif(ON_CPU, reason="needs CUDA itself (not rehearsed on the CPU)")


def size(gpu: int) -> int:
    """An image side: the GPU's, or 32 in the CPU rehearsal."""
    return 32 if ON_CPU else gpu


def relative_error(got: dict, want: dict) -> float:
    flat = lambda d: torch.cat([d[k].float().flatten() for k in sorted(want)])  # noqa: E731
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


def bn_grads(arch: str, size: int, lean: bool, dtype=torch.bfloat16) -> dict:
    """BN gradients after one bf16 channels_last step (dtype float64: the reference, contiguous)."""
    generator = torch.Generator().manual_seed(1)
    batch = 4 if ON_CPU else 16
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(GPU)
    model = models.build(arch, 10, seed=0)
    modes.apply(model, "bn", seed=0)
    models.set_memory_options(model, lean, ())
    if dtype == torch.float64:
        model.to(GPU, dtype=torch.float64)
        loss = F.cross_entropy(model(images.to(GPU, torch.float64)), labels)
    else:
        model.to(GPU, memory_format=torch.channels_last)
        with torch.autocast(GPU.type, torch.bfloat16):
            loss = F.cross_entropy(model(images.to(GPU).contiguous(memory_format=torch.channels_last)).float(), labels)
    loss.backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch, side", [("cifar_resnet_20", 32), ("imagenet_resnet_18", size(64)),
                                        ("imagenet_resnet_50", size(64))])
def test_lean_gradients_match_plain_under_bf16_channels_last(arch, side):
    reference = bn_grads(arch, side, lean=False, dtype=torch.float64)
    plain, lean = bn_grads(arch, side, lean=False), bn_grads(arch, side, lean=True)
    assert plain.keys() == lean.keys() == reference.keys()
    # bf16 keeps 8 bits: the two paths differ by rounding, and neither is further from float64
    assert relative_error(lean, plain) < 0.05
    assert relative_error(lean, reference) < 1.5 * relative_error(plain, reference) + 0.01


@pytest.mark.parametrize("mode", ["bn", "all"])
@pytest.mark.parametrize("conf, side", [("configs/cifar10_resnet20.yaml", 32), ("configs/imagenet_resnet18.yaml", size(224))])
def test_twenty_steps_train_on_the_gpu(conf, side, mode, tmp_path):
    batch = 4 if ON_CPU else 64
    cfg = config.load(conf, [f"mode={mode}", "data.name=synthetic", f"data.synthetic_image_size={side}",
                             f"data.synthetic_samples={10 * batch}", f"data.batch_size={batch}", f"train.bn_batch={batch}",
                             f"data.eval_batch_size={batch}", "model.num_classes=10", "optim.epochs=2",
                             f"train.device={GPU.type}", "train.log_every=5", "train.progress=lines"])
    summary = train.run(cfg, tmp_path / "run")
    assert summary["step"] == 20 and summary["finished"]
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert str(GPU) in log
    if GPU.type == "cuda":  # bf16 autocast stores the frozen weights in bf16 (train.frozen_dtype=auto)
        assert "frozen weights bf16" in log and "bf16" in log
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert losses and all(loss == loss and loss < 20 for loss in losses)  # finite


@pytest.fixture
def nccl_group():
    torch.distributed.init_process_group("gloo" if ON_CPU else "nccl", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1, device_id=None if ON_CPU else GPU)
    yield
    dist.teardown()


def cfg_for(engine: str):
    return config.load("configs/cifar10_resnet20.yaml", ["data.name=synthetic", "data.batch_size=32", "train.bn_batch=32",
                                                          f"dist.engine={engine}", f"train.device={GPU.type}",
                                                          "train.precision=bf16"])


def losses_of(engine_obj, plan, steps=5) -> list[float]:
    generator = torch.Generator(GPU.type).manual_seed(0)
    out = []
    for _ in range(steps):
        images = torch.randn(32, 3, 32, 32, device=GPU, generator=generator).contiguous(memory_format=plan.memory_format)
        labels = torch.randint(0, 10, (32,), device=GPU, generator=generator)
        out.append(engine_obj.train_step(images, labels, plan.autocast)[0].item())
    return out


def test_ddp_over_nccl_on_the_chosen_device(nccl_group):
    from torch.nn.parallel import DistributedDataParallel
    cfg = cfg_for("ddp")
    plan = plan_mod.resolve(cfg, GPU, memory=memory)
    single = network.build(cfg, plan, 10)
    reference = losses_of(engines.wrap(cfg, plan, single.model, single.masks, dist.Context(0, 1, 0, GPU)), plan)
    net = network.build(cfg, plan, 10)
    engine = engines.wrap(cfg, plan, net.model, net.masks, dist.Context(0, 1, 0, GPU))
    engine.net = DistributedDataParallel(net.model, device_ids=None if ON_CPU else [GPU.index])  # what a world > 1 wraps
    assert losses_of(engine, plan) == pytest.approx(reference, rel=1e-2)


def test_fsdp_over_nccl_gathers_bf16(nccl_group):
    from torch.distributed.device_mesh import init_device_mesh

    from bnonly_dist.engines.base import Engine
    from bnonly_dist.engines.fsdp import shard, shard_units
    from bnonly_dist.engines.optim import make_optimizer
    cfg = cfg_for("fsdp")
    plan = plan_mod.resolve(cfg, GPU, memory=memory)
    assert plan.bf16 and not plan.channels_last  # channels_last=auto leaves FSDP's weights NCHW (plan.py)
    single = network.build(cfg, plan, 10)
    reference = losses_of(engines.wrap(cfg, plan, single.model, single.masks, dist.Context(0, 1, 0, GPU)), plan)
    net = network.build(cfg, plan, 10)
    shard(net.model, shard_units(net.model, "block"), init_device_mesh(GPU.type, (1,)), bf16=True)
    engine = Engine(net.model, make_optimizer(net.model, net.masks, cfg.optim), net.masks, cfg.optim.weight_decay)
    assert losses_of(engine, plan) == pytest.approx(reference, rel=1e-2)


@needs_cuda
def test_deepspeed_single_gpu_computes_in_bf16(tmp_path):
    pytest.importorskip("deepspeed")
    cfg = config.load("configs/cifar10_resnet20.yaml", [
        "data.name=synthetic", "data.batch_size=32", "train.bn_batch=32", "optim.epochs=1", "dist.engine=deepspeed",
        "train.device=cuda",
        "train.max_steps=5", "train.frozen_dtype=bf16", "train.precision=bf16", "train.progress=lines"])
    summary = train.run(cfg, tmp_path / "run")  # bf16 frozen weights crash if DeepSpeed drops the autocast
    assert summary["step"] == 5 and summary["engine"] == "deepspeed"
    dist.teardown()


def test_deterministic_resume_is_bit_identical_on_the_gpu(cifar_root, tmp_path):
    def cfg(*extra):
        return config.load("configs/cifar10_resnet20.yaml", [
            f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "data.eval_batch_size=50",
            "optim.epochs=2",
            "optim.milestones=[1]", f"train.device={GPU.type}", "train.deterministic=true", "train.checkpoint_every=4",
            "train.progress=lines", *(["model.arch=cifar_resnet_14"] if ON_CPU else []), *extra])
    whole = train.run(cfg(), tmp_path / "whole")
    train.run(cfg("train.max_steps=13"), tmp_path / "part")  # stops mid-epoch 1
    resumed = train.run(cfg(), tmp_path / "part")
    assert resumed["fingerprint"] == whole["fingerprint"] and resumed["step"] == whole["step"] == 20


@pytest.mark.parametrize("decode", [pytest.param("mixed", marks=needs_cuda), "cpu"])
def test_dali_decodes_onto_the_gpu(decode, tmp_path):
    pytest.importorskip("nvidia.dali")
    from bnonly_dist.data.dali import DaliImageNetSource
    root, _ = fake.write_imagenet(tmp_path / "imagenet", num_classes=4, train_per_class=16, val_per_class=5,
                                  sides=(48, 64) if ON_CPU else (200, 400))
    source = DaliImageNetSource(str(root), 16, 8, 0, 1, seed=0, device=GPU, decode=decode, num_threads=2,
                                image_size=size(224), resize_size=size(256), min_area=0.08, channels_last=True)
    batches = list(source.train_epoch(0))
    assert len(batches) == 4
    for images, labels in batches:
        assert images.device == GPU and labels.device == GPU and images.shape == (16, 3, size(224), size(224))
        assert images.is_contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # one pipeline serves every evaluation
        assert sum(int((labels >= 0).sum()) for _, labels in source.eval_batches()) == 20
    assert source.eval_pipelines_built == 1
    epoch = source.train_epoch(1)
    next(epoch)
    state = source.state()
    rest = list(epoch)  # the training pipeline goes on into epoch 1, and resumes there bit for bit
    again = DaliImageNetSource(str(root), 16, 8, 0, 1, seed=0, device=GPU, decode=decode, num_threads=2,
                               image_size=size(224), resize_size=size(256), min_area=0.08, channels_last=True)
    again.load_state(state)
    resumed = list(again.train_epoch(1, start_step=1))
    assert source.train_pipelines_built == 1 and len(rest) == len(resumed) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, resumed))
