import contextlib

import pytest
import torch

from bnonly_dist import models, modes
from bnonly_dist.config import OptimConfig
from bnonly_dist.engines.base import Engine
from bnonly_dist.engines.optim import make_optimizer

ARCH = "cifar_resnet_14"
EXPECTED_ROLES = {
    "all": {"conv", "shortcut", "bn", "output"}, "bn": {"bn"}, "bn_output": {"bn", "output"},
    "bn_shortcut_output": {"bn", "shortcut", "output"}, "shortcut_output": {"shortcut", "output"},
    "output": {"output"}, "none": set(), "bn_fixed": {"conv", "shortcut", "output"},
}


def run_steps(mode: str, steps: int = 3, weight_decay: float = 0.1):
    """Real SGD steps (momentum, strong weight decay) from a fixed init; returns (before, after, masks)."""
    torch.manual_seed(0)
    model = models.build(ARCH, 10, seed=1)
    masks = modes.apply(model, mode, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, masks, OptimConfig(lr=0.1, weight_decay=weight_decay))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(steps):
        Engine(model, optimizer, masks, weight_decay).train_step(images, labels, contextlib.nullcontext)
    return model, before, masks


@pytest.mark.parametrize("mode", sorted(EXPECTED_ROLES))
def test_exactly_the_intended_parameters_change(mode):
    model, before, _ = run_steps(mode)
    roles = models.parameter_roles(model)
    for name, param in model.named_parameters():
        changed = ~torch.eq(param.detach(), before[name])
        if roles[name] in EXPECTED_ROLES[mode]:
            # every element of a trained tensor moves (weight decay alone moves non-zero ones)
            assert changed.float().mean() > 0.5, f"{mode}: {name} did not train"
        else:
            assert not changed.any(), f"{mode}: frozen {name} changed"
    # BN running statistics keep updating in every mode (the model is in train mode).
    assert not torch.equal(model.state_dict()["bn1.running_mean"], before["bn1.running_mean"])


def test_bn_fixed_pins_gamma_one_beta_zero():
    model, _, _ = run_steps("bn_fixed")
    for name, param in model.named_parameters():
        if models.parameter_roles(model)[name] == "bn":
            assert torch.equal(param, torch.full_like(param, 1.0 if name.endswith("weight") else 0.0))


def test_random_per_channel_trains_exactly_the_masked_elements():
    model, before, masks = run_steps("random_per_channel")
    counts = models.parameter_counts(model)
    assert sum(int(m.sum()) for m in masks.values()) == counts["bn"]  # same count as BN
    assert modes.trainable_count(model, masks) == counts["bn"]
    for name, param in model.named_parameters():
        changed = ~torch.eq(param.detach(), before[name])
        if name in masks:
            assert torch.equal(changed, masks[name]), name  # all masked elements moved, nothing else
            assert (masks[name].flatten(1).sum(1) == 2).all()  # 2 per output channel
        else:
            assert not changed.any(), name


def test_random_per_channel_masks_are_fixed_by_seed():
    model = models.build(ARCH, 10, seed=1)
    a = modes.apply(model, "random_per_channel", seed=3)
    b = modes.apply(model, "random_per_channel", seed=3)
    c = modes.apply(model, "random_per_channel", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_weight_decay_only_on_trainable_tensors():
    model = models.build(ARCH, 10, seed=1)
    masks = modes.apply(model, "bn", seed=1)
    optimizer = make_optimizer(model, masks, OptimConfig(weight_decay=0.5))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in in_optimizer) == param.requires_grad, name
    none_masks = modes.apply(model, "none", seed=1)
    assert make_optimizer(model, none_masks, OptimConfig()) is None
