"""engines.wrap(): the model as the loop drives it, per `dist.engine` (ddp, fsdp, deepspeed).

In: the built network, its gradient masks, the config and plan, the process context. Out:
an Engine (base.py): one training step, the world's BN running statistics, the model and
optimizer part of a checkpoint (save/load), BN parameters and the full state for digests.
Which engines exist and what each supports is one table, config.catalog.ENGINES; optim
builds the optimizer an engine owns and holds the learning-rate schedule.
"""
from __future__ import annotations

import importlib

import torch

from bnonly_dist.config import Config
from bnonly_dist.config.catalog import ENGINES
from bnonly_dist.config.plan import Plan
from bnonly_dist.dist import Context
from bnonly_dist.engines.base import Engine


def wrap(cfg: Config, plan: Plan, model: torch.nn.Module, masks: dict, ctx: Context) -> Engine:
    """Wrap a model that is on its device and has its mode applied; builds the optimizer.

    plan carries the resolved precision: DeepSpeed runs its forward under its own autocast
    setting and FSDP gathers parameters in its own dtype, so both are told about bf16. The engine's
    class comes from the one table of engines (config.catalog.ENGINES), imported only when chosen."""
    module, name = ENGINES[cfg.dist.engine].cls.split(":")
    engine = getattr(importlib.import_module(f"bnonly_dist.engines.{module}"), name)
    return engine(model, masks, cfg, plan, ctx)
