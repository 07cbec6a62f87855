"""BN affine statistics: gammas and betas per stage, and the fraction of channels switched off."""
from __future__ import annotations

import torch
from torch import nn

from bnonly_dist.models import parameter_roles


def bn_stage(name: str) -> str:
    """'layer2.3.bn1.weight' -> 'layer2'; the stem's BN -> 'stem'."""
    head = name.split(".", 1)[0]
    return head if head.startswith("layer") else "stem"


def bn_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BN affine parameters of an unsharded model by name (see Engine.bn_parameters)."""
    roles = parameter_roles(model)
    return {name: param for name, param in model.named_parameters() if roles[name] == "bn"}


def bn_affine(bn_params: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{stage: {'gamma': all gammas of the stage, 'beta': ...}} as flat float32 CPU tensors."""
    stages: dict[str, dict[str, list]] = {}
    for name, param in bn_params.items():
        kind = "gamma" if name.endswith("weight") else "beta"
        stages.setdefault(bn_stage(name), {"gamma": [], "beta": []})[kind].append(param.detach().float().cpu().view(-1))
    return {stage: {k: torch.cat(v) for k, v in parts.items()} for stage, parts in stages.items()}


def gamma_stats(bn_params: dict[str, torch.Tensor], threshold: float) -> dict[str, float]:
    """Fraction of channels with |gamma| < threshold, overall and per stage, and mean |gamma|."""
    affine = bn_affine(bn_params)
    stats = {}
    for stage, parts in affine.items():
        stats[f"gamma_small_frac/{stage}"] = (parts["gamma"].abs() < threshold).float().mean().item()
    gammas = torch.cat([parts["gamma"] for parts in affine.values()])
    stats["gamma_small_frac"] = (gammas.abs() < threshold).float().mean().item()
    stats["gamma_abs_mean"] = gammas.abs().mean().item()
    return stats
