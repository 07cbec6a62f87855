"""The one recipe that turns (config, plan) into the network a run trains.

Frozen weights from the seed, the mode (which parameters learn), the frozen-weight
digest (taken before any bf16 cast: it names the weights the seed defines), the memory
options of the plan, then the move to the device in the plan's memory format. train,
bench, bench-checkpoint, eval and analysis all call build().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bnonly_dist import dist, models, modes
from bnonly_dist.config import Config
from bnonly_dist.config.plan import Plan
from bnonly_dist.models.layers import set_bn_groups
from bnonly_dist.run import checkpoint


@dataclass
class Network:
    model: torch.nn.Module  # on the plan's device, in its memory format
    masks: dict[str, torch.Tensor]  # element masks of partly trained tensors (random_per_channel), on the device
    frozen_sha: str  # sha256 of the frozen weights as the seed defines them (fp32)
    trainable: int  # numbers that learn
    total: int  # all parameter numbers


def build(cfg: Config, plan: Plan, classes: int, mode: str | None = None, lean: bool | None = None) -> Network:
    """The network of cfg under plan (mode and lean may be overridden: bench's variants)."""
    model = models.build(cfg.model.arch, classes, cfg.seed, cfg.model.bn_init)
    masks = modes.apply(model, mode or cfg.mode, cfg.seed)
    frozen_sha = checkpoint.frozen_digest(model)
    models.set_memory_options(model, plan.lean if lean is None else lean, plan.checkpointed_stages,
                              plan.frozen_dtype)
    set_bn_groups(model, plan.bn.per_rank, dist.bn_group(plan.bn.ranks, cfg.dist.timeout_s))  # collective: groups made once
    trainable, total = modes.trainable_count(model, masks), sum(p.numel() for p in model.parameters())
    model.to(plan.device, memory_format=plan.memory_format)
    return Network(model, {n: m.to(plan.device) for n, m in masks.items()}, frozen_sha, trainable, total)
