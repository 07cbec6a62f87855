"""Model registry: OpenLTH-style names -> modules, parameter roles and counts.

Names: cifar_resnet_N, cifar_resnet_N_W (W = base width, 16 by default: cifar_resnet_14_64
is WRN-14-4), imagenet_resnet_D, imagenet_resnet_D_W (W = base width, 64 by default).
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import nn

from bnonly_dist.models.cifar_resnet import CifarResNet
from bnonly_dist.models.imagenet_resnet import STAGE_BLOCKS, ImageNetResNet
from bnonly_dist.models.init import initialize
from bnonly_dist.models.layers import set_lean

ROLES = ("conv", "shortcut", "bn", "output")


class Arch(NamedTuple):
    family: str  # cifar | imagenet
    depth: int
    width: int


_ARCH = re.compile(r"^(cifar|imagenet)_resnet_(\d+)(?:_(\d+))?$")


def parse_arch(name: str) -> Arch:
    match = _ARCH.match(name)
    if not match:
        raise ValueError(f"unknown architecture {name!r}: use cifar_resnet_N[_W] or imagenet_resnet_D[_W]")
    family, depth, width = match.group(1), int(match.group(2)), match.group(3)
    width = int(width) if width else (16 if family == "cifar" else 64)
    if width < 1:
        raise ValueError(f"{name}: width must be positive")
    if family == "cifar" and ((depth - 2) % 6 or depth < 8):
        raise ValueError(f"{name}: CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    if family == "imagenet" and depth not in STAGE_BLOCKS:
        raise ValueError(f"{name}: ImageNet ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
    return Arch(family, depth, width)


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
    classes = num_classes or (10 if arch.family == "cifar" else 1000)
    counts = parameter_counts(create(name, classes, device="meta"))
    return {"arch": name, "family": arch.family, "depth": arch.depth, "width": arch.width,
            "num_classes": classes, **counts}
