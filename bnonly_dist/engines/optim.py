"""The optimizer over what a mode trains, and the learning rate as a pure function of the step."""
from __future__ import annotations

import bisect
import math

import torch

from bnonly_dist.config import OptimConfig


def make_optimizer(model: torch.nn.Module, masks: dict, optim: OptimConfig) -> torch.optim.Optimizer | None:
    """SGD over the trainable tensors; masked ones decay inside modes.mask_gradients."""
    full = [p for n, p in model.named_parameters() if p.requires_grad and n not in masks]
    partial = [p for n, p in model.named_parameters() if p.requires_grad and n in masks]
    groups = [{"params": full, "weight_decay": optim.weight_decay}, {"params": partial, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return None  # mode none: only BN running statistics move
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)


# Nothing to checkpoint: the schedule is recomputed from the step.
def lr_at(step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:  # linear warm-up from lr / warmup_steps to lr
        return optim.lr * (step + 1) / warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "step":
        epoch = step // steps_per_epoch
        return optim.lr * optim.lr_decay ** bisect.bisect_right(optim.milestones, epoch)
    total = optim.epochs * steps_per_epoch
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * optim.lr * (1 + math.cos(math.pi * min(1.0, progress)))
