"""Training modes applied to a model: which parameters learn (OpenLTH's --others_frozen etc.).

The modes themselves are data in catalog.py (MODES); this module sets requires_grad,
draws the element masks of random_per_channel and confines their gradients.
"""
from __future__ import annotations

import torch
from torch import nn

from bnonly_dist.config.catalog import MODES, freezes_convolutions  # noqa: F401  (re-exported)
from bnonly_dist.models import parameter_roles
from bnonly_dist.models.init import name_seed


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
