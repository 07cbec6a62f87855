"""The lean autograd path, activation checkpointing and bf16 frozen weights change memory, not math."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from bnonly_dist import config, models, modes
from bnonly_dist.config import ConfigError, plan
from bnonly_dist.models import bitmask, layers
from bnonly_dist.perf import bench_runner

# One architecture per block family: CIFAR basic blocks, ImageNet basic blocks, ImageNet
# bottlenecks (narrow, so that float64 stays fast), each with projection shortcuts.
FAMILIES = [("cifar_resnet_14", 32), ("imagenet_resnet_18_16", 64), ("imagenet_resnet_50_16", 64)]


def grads(arch, size, mode, dtype, lean, checkpointed=(), batch=8, memory_format=torch.contiguous_format):
    """Gradients of every trainable parameter and the BN running statistics after one step."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    model = models.build(arch, 10, seed=0)
    modes.apply(model, mode, seed=0)
    models.set_memory_options(model, lean, checkpointed)
    model.to(dtype=dtype, memory_format=memory_format)
    F.cross_entropy(model(images.to(dtype).contiguous(memory_format=memory_format)), labels).backward()
    out = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    out.update({n: b.double() for n, b in model.named_buffers()})
    return out


def saved_bytes(arch, size, mode, lean, checkpointed=()):
    """Bytes autograd keeps for backward after one forward of a batch of 4."""
    model = models.build(arch, 10, seed=0)
    modes.apply(model, mode, seed=0)
    models.set_memory_options(model, lean, checkpointed)
    images, labels = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    return bench_runner.saved_activation_bytes(model, images, labels, contextlib.nullcontext)


def relative_error(got: dict, want: dict) -> float:
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(want) if "running" not in k])  # noqa: E731
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


@pytest.mark.parametrize("arch, size", FAMILIES)
@pytest.mark.parametrize("mode", ["bn", "bn_output", "shortcut_output"])
def test_lean_gradients_equal_autograd_in_float64(arch, size, mode):
    plain = grads(arch, size, mode, torch.float64, lean=False)
    lean = grads(arch, size, mode, torch.float64, lean=True)
    assert plain.keys() == lean.keys() and any(k.endswith("weight") for k in plain)
    for name in plain:
        torch.testing.assert_close(lean[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_lean_gradients_match_in_float32(arch, size):
    reference = grads(arch, size, "bn", torch.float64, lean=False)
    plain = grads(arch, size, "bn", torch.float32, lean=False)
    lean = grads(arch, size, "bn", torch.float32, lean=True)
    # The lean path runs the same kernels as plain autograd: equal up to float32 rounding in
    # the transposed convolution, and as close to the float64 gradient as plain autograd is.
    assert relative_error(lean, plain) < 1e-4
    assert relative_error(lean, reference) < relative_error(plain, reference) + 1e-4
    for name in plain:
        if "running" in name:
            torch.testing.assert_close(lean[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lean_works_channels_last():
    plain = grads("imagenet_resnet_18_16", 64, "bn", torch.float32, lean=False, memory_format=torch.channels_last)
    lean = grads("imagenet_resnet_18_16", 64, "bn", torch.float32, lean=True, memory_format=torch.channels_last)
    assert relative_error(lean, plain) < 1e-4


def test_lean_leaves_trained_convolutions_to_autograd():
    """mode=all with the switch on: convolutions that learn keep plain autograd and get gradients."""
    plain = grads("cifar_resnet_14", 32, "all", torch.float64, lean=False)
    lean = grads("cifar_resnet_14", 32, "all", torch.float64, lean=True)
    assert "layer1.0.conv1.weight" in lean
    for name in plain:
        torch.testing.assert_close(lean[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


def saved_tensors(module, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(*inputs)
    return saved


def test_frozen_conv_saves_only_its_weight():
    conv = layers.Conv2d(8, 16, 3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    assert any(t is x for t in saved_tensors(conv, x))  # plain autograd keeps the input
    conv.lean = True
    saved = saved_tensors(conv, x)
    assert len(saved) == 1 and saved[0] is conv.weight


def test_bn_relu_saves_its_input_and_a_one_bit_mask():
    bn = layers.BatchNorm2d(16)
    bn.lean = True
    x = torch.randn(4, 16, 9, 9, requires_grad=True)
    saved = saved_tensors(bn, x, True)
    full = [t for t in saved if t.numel() == x.numel()]
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert len(full) == 1 and full[0] is x  # one full tensor, not the output as well
    assert len(masks) == 1 and masks[0].numel() == -(-x.numel() // 8)  # 1 bit per element
    assert sum(t.numel() for t in saved if t.numel() < x.numel() and t.dtype != torch.uint8) <= 3 * 16


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_saves_int32_positions_and_adds_shared_maxima(channels_last):
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    x[:, :, 2, 2] = 10  # the maximum of four overlapping windows
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    results = []
    for lean in [False, True]:
        pool = layers.MaxPool2d(3, 2, 1)
        pool.lean = lean
        x_in = x.clone().requires_grad_()
        out = pool(x_in)
        out.backward(grad)
        results.append((out.detach(), x_in.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # The gradient keeps the forward's layout: no NCHW copy of a channels_last tensor.
    assert results[1][1].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert results[1][1].stride() == results[0][1].stride()
    saved = saved_tensors(pool, x.clone().requires_grad_())
    assert len(saved) == 1 and saved[0].dtype == torch.int32 and saved[0].shape == (2, 4, 5, 5)
    # bf16: shared maxima are added in fp32, then rounded once (what a GPU run gets, without bf16 atomics).
    pool, x_bf16 = layers.MaxPool2d(3, 2, 1), x.to(torch.bfloat16).requires_grad_()
    pool.lean = True
    pool(x_bf16).backward(grad.to(torch.bfloat16))
    x_fp32 = x.to(torch.bfloat16).float().requires_grad_()
    F.max_pool2d(x_fp32, 3, 2, 1).backward(grad.to(torch.bfloat16).float())
    assert x_bf16.grad.dtype == torch.bfloat16 and torch.equal(x_bf16.grad, x_fp32.grad.to(torch.bfloat16))
    assert x_bf16.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("shape, channels_last", [((3, 5, 7, 2), False), ((4, 8, 6, 6), True), ((13,), False)])
def test_bits_round_trip(shape, channels_last):
    mask = torch.rand(shape) > 0.5
    if channels_last:
        mask = mask.contiguous(memory_format=torch.channels_last)
    packed = bitmask.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(bitmask.unpack_bits(packed, mask.shape, mask.stride()).bool(), mask)


@pytest.mark.parametrize("arch, size, target", [("cifar_resnet_20", 32, 0.6), ("imagenet_resnet_50_16", 64, 0.6)])
def test_lean_bn_saves_at_most_six_tenths_of_full_training(arch, size, target):
    saved = {name: saved_bytes(arch, size, mode, lean)
             for name, mode, lean in [("all", "all", False), ("plain", "bn", False), ("lean", "bn", True)]}
    assert saved["plain"] > 0.95 * saved["all"]  # plain autograd keeps what full training keeps
    assert saved["lean"] <= target * saved["all"]


@pytest.mark.parametrize("lean", [False, True])
def test_activation_checkpointing_keeps_the_bits(lean):
    mode = "bn" if lean else "all"
    plain = grads("cifar_resnet_56", 32, mode, torch.float32, lean)
    checkpointed = grads("cifar_resnet_56", 32, mode, torch.float32, lean, checkpointed=(1, 2, 3))
    assert plain.keys() == checkpointed.keys()
    for name in plain:  # gradients and running statistics (updated once, not twice)
        assert torch.equal(plain[name], checkpointed[name]), name
    assert torch.equal(checkpointed["layer1.0.bn1.num_batches_tracked"], torch.tensor(1.0, dtype=torch.float64))


def test_activation_checkpointing_saves_memory():
    saved = {stages: saved_bytes("cifar_resnet_56", 32, "bn", True, stages) for stages in [(), (1, 2, 3)]}
    # 9 blocks per stage in segments of 3: only the segments' inputs stay.
    assert saved[(1, 2, 3)] < 0.4 * saved[()]


def test_frozen_bf16_weights_give_the_same_gradients_under_autocast():
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    results = {}
    for dtype in [None, torch.bfloat16]:
        model = models.build("cifar_resnet_14", 10, seed=0)
        modes.apply(model, "bn", seed=0)
        models.set_memory_options(model, True, frozen_dtype=dtype)
        with torch.autocast("cpu", torch.bfloat16):
            F.cross_entropy(model(images).float(), labels).backward()
        results[dtype] = model
    fp32, bf16 = results[None], results[torch.bfloat16]
    assert bf16.layer1[0].conv1.weight.dtype == torch.bfloat16 and bf16.fc.weight.dtype == torch.bfloat16
    assert bf16.layer1[0].bn1.weight.dtype == torch.float32  # BN parameters learn in fp32
    frozen = lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)  # noqa: E731
    assert frozen(bf16) * 2 == frozen(fp32)
    # Autocast already ran the convolutions in bf16: storing the weights so changes no bit.
    for (name, a), (_, b) in zip(fp32.named_parameters(), bf16.named_parameters()):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name


def test_lean_default_follows_the_mode(monkeypatch):
    from bnonly_dist.models import memory
    monkeypatch.setattr(memory, "rank_memory_bytes", lambda device: 2**20)  # 1 MiB: nothing plain fits
    cfg = lambda *o: config.load("configs/cifar10_resnet20.yaml", list(o))  # noqa: E731
    lean = lambda c: plan.resolve(c, torch.device("cpu"), memory=memory).lean  # noqa: E731
    assert lean(cfg("mode=bn")) and lean(cfg("mode=bn_output"))
    assert not lean(cfg("mode=output"))  # no gradient reaches the body: plain autograd keeps only the pooled features
    assert not lean(cfg("mode=all")) and not lean(cfg("mode=random_per_channel"))
    assert not lean(cfg("mode=bn", "train.lean_autograd=false"))
    with pytest.raises(ConfigError, match="residual stages are 1 to 3"):
        cfg("train.activation_checkpointing=[4]")
    with pytest.raises(ConfigError, match="train.precision=bf16"):
        plan.resolve(cfg("train.frozen_dtype=bf16"), torch.device("cpu"), memory=memory)


def test_lean_gradients_keep_the_forwards_layout(monkeypatch):
    """Every BN backward of a channels_last lean net gets its gradient channels_last: one in
    another layout (NCHW from the average pool) slowed BN's backward 2-7x on the CPU."""
    cl, layouts = torch.channels_last, []
    backward = layers.BatchNormReLUFunction.backward

    def record(ctx, grad):
        layouts.append(grad.is_contiguous(memory_format=cl))
        return backward(ctx, grad)

    monkeypatch.setattr(layers.BatchNormReLUFunction, "backward", staticmethod(record))
    model = models.build("cifar_resnet_20", 10, seed=0)
    modes.apply(model, "bn", 0)
    models.set_memory_options(model, True)
    model.to(memory_format=cl)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=cl)
    F.cross_entropy(model(images), torch.arange(4)).backward()
    assert len(layouts) == 21 and all(layouts)  # the stem, 18 in the blocks, 2 in projection shortcuts
    grad = torch.randn(2, 3, 4, 4)  # NCHW
    mask = (torch.randn(2, 3, 4, 4) > 0).contiguous(memory_format=cl)
    out = bitmask.apply_mask(grad, bitmask.pack_bits(mask), mask.shape, mask.stride())
    assert out.is_contiguous(memory_format=cl) and torch.equal(out, grad * mask)
