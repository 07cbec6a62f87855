"""The Plan resolves every auto setting once; cross-key rules fail at load; one model builder."""
import subprocess
import sys

import pytest
import torch

from bnonly_dist import config, network
from bnonly_dist.config import ConfigError, plan
from bnonly_dist.config.catalog import num_classes
from bnonly_dist.models import memory

CPU = torch.device("cpu")


def cfg(*overrides, path="configs/cifar10_resnet20.yaml"):
    return config.load(path, list(overrides))


def test_auto_settings_resolve_once_for_the_device():
    p = plan.resolve(cfg(), CPU, memory=memory)
    assert (p.device, p.bf16, p.precision, p.frozen_dtype, p.engine) == (CPU, False, "fp32", None, "ddp")
    assert p.channels_last == plan.default_channels_last(CPU) and not p.lean  # ResNet-20 fits: plain is faster
    assert p.decode is None and p.checkpointed_stages == ()
    explicit = plan.resolve(cfg("train.precision=bf16", "train.channels_last=true", "train.lean_autograd=false",
                                "train.frozen_dtype=bf16", "train.activation_checkpointing=[3,1]"), CPU, memory=memory)
    assert (explicit.bf16, explicit.channels_last, explicit.lean) == (True, True, False)
    assert explicit.frozen_dtype == torch.bfloat16 and explicit.checkpointed_stages == (1, 3)
    assert explicit.memory_format == torch.channels_last
    line = explicit.describe()
    assert "\n" not in line and "bf16" in line and "checkpointed stages 1,3" in line


def test_lean_auto_turns_on_where_plain_autograd_would_not_fit(monkeypatch):
    need = memory.plain_saved_bytes("cifar_resnet_20", 10, "bn", 128, 224, True)
    monkeypatch.setattr(memory, "rank_memory_bytes", lambda device: int(need / plan.LEAN_MEMORY_SHARE) + 1)
    fits = plan.resolve(cfg(), CPU, memory=memory)
    assert not fits.lean and "not more than 50%" in fits.describe()
    assert plan.resolve(cfg("data.batch_size=256", "train.bn_batch=256"), CPU, memory=memory).lean  # twice the images, twice the bytes
    assert not plan.resolve(cfg("data.batch_size=256", "train.bn_batch=256"), CPU, world=2, memory=memory).lean  # each rank keeps half of them
    assert not plan.resolve(cfg("data.batch_size=256", "train.bn_batch=256", "mode=all"),
                            CPU, memory=memory).lean  # nothing frozen to be lean about
    assert not plan.resolve(cfg("data.batch_size=256", "train.bn_batch=256", "train.lean_autograd=false"), CPU, memory=memory).lean
    monkeypatch.setattr(memory, "rank_memory_bytes", lambda device: None)
    assert plan.resolve(cfg(), CPU, memory=memory).lean  # memory unknown: the choice that fits


def real_saved_bytes(arch, mode, stages=()):
    from bnonly_dist.perf.bench_runner import saved_activation_bytes
    c = cfg(f"model.arch={arch}", f"mode={mode}", "data.image_size=64", f"train.activation_checkpointing={list(stages)}",
            "train.lean_autograd=false")
    net = network.build(c, plan.resolve(c, CPU, memory=memory), 10)
    images = torch.randn(4, 3, 32 if "cifar" in arch else 64, 32 if "cifar" in arch else 64)
    return saved_activation_bytes(net.model, images.contiguous(memory_format=torch.channels_last),
                                  torch.zeros(4, dtype=torch.long), plan.resolve(c, CPU, memory=memory).autocast)


@pytest.mark.parametrize("arch, mode", [("cifar_resnet_20", "bn"), ("cifar_resnet_20", "all"),
                                        ("cifar_resnet_20", "bn_output"), ("imagenet_resnet_18_8", "bn")])
def test_saved_bytes_estimate_is_what_autograd_keeps(arch, mode):
    assert memory.plain_saved_bytes(arch, 10, mode, 4, 64, True) == real_saved_bytes(arch, mode)


def test_saved_bytes_estimate_of_checkpointed_stages_counts_inputs_and_one_recomputed_segment():
    whole = memory.plain_saved_bytes("cifar_resnet_20", 10, "bn", 4, 64, True)
    stage2 = memory.plain_saved_bytes("cifar_resnet_20", 10, "bn", 4, 64, True, (2,))
    outside = real_saved_bytes("cifar_resnet_20", "bn", (2,))  # the hooks see nothing inside a checkpoint
    block_input = 4 * 16 * 32 * 32 * 4  # what stage 2's first segment keeps: its input, 16 x 32 x 32 fp32
    assert outside + block_input < stage2 < whole  # ResNet-20's stage 2: 3 blocks in segments of 2 and 1


def test_imagenet_decode_resolves_per_device_and_refuses_gpu_decode_on_cpu():
    imagenet = "configs/imagenet_resnet18.yaml"
    assert plan.resolve(cfg(path=imagenet), CPU, memory=memory).decode == "cpu"
    with pytest.raises(ConfigError, match="data.decode=mixed"):
        plan.resolve(cfg("data.decode=mixed", path=imagenet), CPU, memory=memory)


@pytest.mark.parametrize("overrides, words", [
    (["dist.engine=deepspeed", "mode=random_per_channel"], "masks gradients inside tensors"),
    (["dist.engine=deepspeed", "mode=none"], "trains nothing"),
    (["train.frozen_dtype=bf16", "train.precision=fp32"], "train.frozen_dtype=bf16 needs bf16"),
    (["train.activation_checkpointing=[4]"], "residual stages are 1 to 3"),
])
def test_rules_across_keys_fail_when_the_config_loads(overrides, words):
    with pytest.raises(ConfigError, match=words):
        cfg(*overrides)


def test_network_build_is_the_one_recipe():
    c = cfg()
    plain = network.build(c, plan.resolve(c, CPU, memory=memory), 10)
    c16 = cfg("train.precision=bf16", "train.frozen_dtype=bf16", "train.channels_last=true")
    lean16 = network.build(c16, plan.resolve(c16, CPU, memory=memory), 10)
    assert plain.frozen_sha == lean16.frozen_sha  # digest of the seed's weights, before the bf16 cast
    assert lean16.model.conv1.weight.dtype == torch.bfloat16 and plain.model.conv1.weight.dtype == torch.float32
    assert lean16.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.trainable == 2 * sum(m.num_features for m in plain.model.modules()
                                      if isinstance(m, torch.nn.BatchNorm2d))
    assert num_classes(c) == 10 and num_classes(cfg(path="configs/imagenet_resnet18.yaml")) == 1000
    assert num_classes(cfg("model.num_classes=7")) == 7


def test_the_cli_and_config_load_without_torch():
    code = ("import sys, bnonly_dist.cli, bnonly_dist.config; "
            "bnonly_dist.config.load('configs/imagenet_resnet200.yaml'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
