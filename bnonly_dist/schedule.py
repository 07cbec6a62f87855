"""Learning rate as a pure function of the optimizer step (nothing to checkpoint)."""
from __future__ import annotations

import bisect
import math

from bnonly_dist.config import OptimConfig


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
