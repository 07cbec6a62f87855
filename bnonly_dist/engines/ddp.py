"""DistributedDataParallel: every rank holds the whole model; the BN-only gradients
(ResNet-50: 53k numbers) are all-reduced, which costs next to nothing."""
from __future__ import annotations

import inspect

import torch
from torch.nn.parallel import DistributedDataParallel

from bnonly_dist.config import Config
from bnonly_dist.config.plan import Plan
from bnonly_dist.dist import Context
from bnonly_dist.engines.base import Engine
from bnonly_dist.engines.optim import make_optimizer


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, model: torch.nn.Module, masks: dict, cfg: Config, plan: Plan, ctx: Context):
        # plan: what every engine is given (engines.wrap); DDP runs the model as the plan built it
        super().__init__(model, make_optimizer(model, masks, cfg.optim), masks, cfg.optim.weight_decay)
        if ctx.world > 1 and self.optimizer is not None:  # mode none has no gradients to reduce
            # The chosen device, not the local rank: under `srun --gpus-per-task 1` every task
            # sees one GPU, index 0, whatever its SLURM_LOCALID.
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=device_ids, **NO_FORWARD_BUFFER_SYNC)


# No buffer broadcast in forward: each rank's BN running statistics follow its own groups and are
# averaged over the world where they are used (Engine.world_bn_statistics). torch 2.13 names this
# forward_sync_buffers=False and warns on every rank about the older broadcast_buffers=False; the new
# option still broadcasts buffers once at construction, which changes nothing here: every rank has
# just built the same model from the seed, and a checkpoint's statistics are loaded after the wrap.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
