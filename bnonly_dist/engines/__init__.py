"""engines.wrap(): the model as the loop drives it, per `dist.engine` (ddp, fsdp, deepspeed).

In: the built network, its gradient masks, the config and plan, the process context. Out:
an Engine (base.py): one training step, the world's BN running statistics, the model and
optimizer part of a checkpoint (save/load), BN parameters and the full state for digests.
"""
from __future__ import annotations

import torch

from bnonly_dist.config import Config
from bnonly_dist.config.plan import Plan
from bnonly_dist.dist import Context
from bnonly_dist.engines.base import Engine


def wrap(cfg: Config, plan: Plan, model: torch.nn.Module, masks: dict, ctx: Context) -> Engine:
    """Wrap a model that is on its device and has its mode applied; builds the optimizer.

    plan carries the resolved precision: DeepSpeed runs its forward under its own autocast
    setting and FSDP gathers parameters in its own dtype, so both are told about bf16."""
    if cfg.dist.engine == "fsdp":
        from bnonly_dist.engines.fsdp import FSDPEngine
        return FSDPEngine(model, masks, cfg, plan, ctx)
    if cfg.dist.engine == "deepspeed":
        from bnonly_dist.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(model, masks, cfg, plan, ctx)
    from bnonly_dist.engines.ddp import DDPEngine
    return DDPEngine(model, masks, cfg, ctx)
