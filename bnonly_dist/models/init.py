"""Initialisation that is a pure function of (seed, parameter name).

Every tensor is drawn from its own generator seeded by a hash of the run seed and the
parameter's name, so the numbers do not depend on construction order, device count or
sharding: any rank can regenerate any frozen weight.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(name_seed(seed, name))


def _fill(param: torch.Tensor, seed: int, name: str, draw) -> None:
    # Draw on the CPU (the same numbers everywhere), then copy to the parameter's device.
    values = torch.empty(param.shape, dtype=torch.float32)
    draw(values, _generator(seed, name))
    param.copy_(values)


BN_INITS = {
    "uniform": (lambda w, g: w.uniform_(0.0, 1.0, generator=g), 0.0),
    "fixed": (lambda w, g: w.fill_(1.0), 0.0),
    "oneone": (lambda w, g: w.fill_(1.0), 1.0),
    "positivenegative": (lambda w, g: w.uniform_(-1.0, 1.0, generator=g), 0.0),
}


@torch.no_grad()
def initialize(model: nn.Module, seed: int, bn_init: str = "uniform") -> None:
    """kaiming_normal conv/linear weights (OpenLTH), PyTorch's default linear bias, BN per bn_init."""
    draw_gamma, beta = BN_INITS[bn_init]
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            _fill(module.weight, seed, prefix + "weight",
                  lambda w, g: nn.init.kaiming_normal_(w, generator=g))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                _fill(module.bias, seed, prefix + "bias", lambda b, g: b.uniform_(-bound, bound, generator=g))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            _fill(module.weight, seed, prefix + "weight", draw_gamma)
            module.bias.fill_(beta)
