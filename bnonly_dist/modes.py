"""Training modes as data: which parameters learn (OpenLTH's --others_frozen etc.).

A mode names the parameter roles that learn (see models.parameter_roles). Two modes
add to that: bn_fixed pins every BN to gamma = 1, beta = 0 (frozen), and
random_per_channel learns k random weights per output channel of every convolution,
k = 2 so that the count equals the BN parameter count (2 per channel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnonly_dist.models import parameter_roles
from bnonly_dist.models.init import name_seed


@dataclass(frozen=True)
class Mode:
    trains: frozenset[str]
    bn_fixed: bool = False
    random_per_channel: int = 0


MODES = {
    "all": Mode(frozenset({"conv", "shortcut", "bn", "output"})),
    "bn": Mode(frozenset({"bn"})),
    "bn_output": Mode(frozenset({"bn", "output"})),
    "bn_shortcut_output": Mode(frozenset({"bn", "shortcut", "output"})),
    "shortcut_output": Mode(frozenset({"shortcut", "output"})),
    "output": Mode(frozenset({"output"})),
    "none": Mode(frozenset()),
    "random_per_channel": Mode(frozenset(), random_per_channel=2),
    "bn_fixed": Mode(frozenset({"conv", "shortcut", "output"}), bn_fixed=True),
}


def freezes_convolutions(mode_name: str) -> bool:
    """Whether the mode leaves every 3x3/1x1 body convolution frozen (the lean path's default)."""
    mode = MODES[mode_name]
    return "conv" not in mode.trains and not mode.random_per_channel


def random_channel_mask(weight: torch.Tensor, k: int, seed: int, name: str) -> torch.Tensor:
    """k distinct random positions per output channel, a pure function of (seed, name)."""
    out_channels, fan_in = weight.shape[0], weight[0].numel()
    generator = torch.Generator().manual_seed(name_seed(seed, f"{name}/mask"))
    picks = torch.rand(out_channels, fan_in, generator=generator).argsort(dim=1)[:, :k]
    mask = torch.zeros(out_channels, fan_in, dtype=torch.bool)
    mask.scatter_(1, picks, True)
    return mask.view_as(weight).to(weight.device)


@torch.no_grad()
def apply(model: nn.Module, mode_name: str, seed: int) -> dict[str, torch.Tensor]:
    """Set requires_grad per the mode; return element masks for partially trained tensors."""
    mode = MODES[mode_name]
    roles = parameter_roles(model)
    masks = {}
    for name, param in model.named_parameters():
        role = roles[name]
        param.requires_grad_(role in mode.trains)
        if mode.bn_fixed and role == "bn":
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        if mode.random_per_channel and role in ("conv", "shortcut"):
            masks[name] = random_channel_mask(param, mode.random_per_channel, seed, name)
            param.requires_grad_(True)
    return masks


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor], weight_decay: float) -> None:
    """Confine gradient and weight decay of partially trained tensors to their mask.

    Their optimizer group has weight_decay = 0: decay is added here, inside the mask, so
    the frozen elements get a zero update (bit for bit unchanged under SGD + momentum).
    """
    if not masks:
        return
    for name, param in model.named_parameters():
        mask = masks.get(name)
        if mask is not None and param.grad is not None:
            param.grad.add_(param, alpha=weight_decay).mul_(mask)


def trainable_count(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    return sum(int(masks[n].sum()) if n in masks else p.numel()
               for n, p in model.named_parameters() if p.requires_grad)
