"""Model registry: OpenLTH-style names (catalog.parse_arch) -> modules, parameter roles and counts.

In: an architecture name, class count, seed and BN init. Out: the nn.Module with frozen
weights drawn from the seed (init), built from blocks and layers (the lean autograd path),
whose BN layers take their statistics over groups (bn_groups); plus parameter roles and
counts (what a mode may train), and memory: what a step of a model keeps for backward.
"""
from __future__ import annotations

import torch
from torch import nn

from bnonly_dist.config.catalog import DEFAULT_CLASSES, Arch, parse_arch  # noqa: F401  (re-exported)
from bnonly_dist.models.cifar_resnet import CifarResNet
from bnonly_dist.models.imagenet_resnet import ImageNetResNet
from bnonly_dist.models.init import initialize
from bnonly_dist.models.layers import set_lean

ROLES = ("conv", "shortcut", "bn", "output")


def create(name: str, num_classes: int, device: torch.device | str = "cpu") -> nn.Module:
    """The module with PyTorch's default init (use build() for the paper's init)."""
    arch = parse_arch(name)
    cls = CifarResNet if arch.family == "cifar" else ImageNetResNet
    with torch.device(device):
        return cls(arch.depth, arch.width, num_classes)


def build(name: str, num_classes: int, seed: int, bn_init: str = "uniform") -> nn.Module:
    """The paper's network on the CPU, initialised as a pure function of (seed, name)."""
    model = create(name, num_classes)
    initialize(model, seed, bn_init)
    return model


@torch.no_grad()
def set_memory_options(model: nn.Module, lean: bool, checkpointed_stages=(), frozen_dtype: torch.dtype | None = None,
                       ) -> None:
    """Lean autograd on or off, activation checkpointing for the listed stages (1-based), and
    frozen conv/linear weights cast to frozen_dtype. Call after modes.apply (it decides what is frozen)."""
    set_lean(model, lean)
    for number, stage in enumerate(model.stages(), 1):
        stage.checkpointed = number in checkpointed_stages
    if frozen_dtype is not None:
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                for param in module.parameters(recurse=False):
                    if not param.requires_grad:
                        param.data = param.data.to(frozen_dtype)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Role of every parameter: conv, shortcut (1x1 projection convs), bn or output."""
    roles = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            role = "bn"
        elif isinstance(module, nn.Linear):
            role = "output"
        elif isinstance(module, nn.Conv2d):
            role = "shortcut" if ".downsample." in f".{module_name}." else "conv"
        else:
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            roles[f"{module_name}.{param_name}"] = role
    return roles


def parameter_counts(model: nn.Module) -> dict[str, int]:
    roles = parameter_roles(model)
    counts = {"total": 0, **{role: 0 for role in ROLES}}
    for name, param in model.named_parameters():
        counts["total"] += param.numel()
        counts[roles[name]] += param.numel()
    return counts


def info(name: str, num_classes: int | None = None) -> dict:
    """Parameter counts of an architecture, built on the meta device (no memory used)."""
    arch = parse_arch(name)
    classes = num_classes or DEFAULT_CLASSES[arch.family]
    counts = parameter_counts(create(name, classes, device="meta"))
    return {"arch": name, "family": arch.family, "depth": arch.depth, "width": arch.width,
            "num_classes": classes, **counts}
