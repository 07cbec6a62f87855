"""FSDP2 (`fully_shard`): parameters, frozen ones included, are sharded across ranks and
gathered one residual block (or stage) at a time. Pays off only for nets too wide to
replicate; the math is the same as DDP's."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import distribute_tensor

from bnonly_dist.config import Config
from bnonly_dist.dist import Context
from bnonly_dist.engines.base import Engine
from bnonly_dist.optim import make_optimizer


def shard_units(model: torch.nn.Module, unit: str) -> list[torch.nn.Module]:
    """The residual stages (layer1..), or the blocks inside them, in forward order."""
    stages = model.stages()
    return stages if unit == "stage" else [block for stage in stages for block in stage]


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, model: torch.nn.Module, masks: dict, cfg: Config, ctx: Context):
        self.sharded = ctx.world > 1  # one process: nothing to shard, same checkpoints
        if self.sharded:
            mesh = init_device_mesh(ctx.device.type, (ctx.world,))
            for unit in shard_units(model, cfg.dist.fsdp_unit):
                fully_shard(unit, mesh=mesh)
            fully_shard(model, mesh=mesh)  # the stem, the head and whatever is left
            params = dict(model.named_parameters())
            masks = {n: distribute_tensor(m, params[n].device_mesh, params[n].placements) for n, m in masks.items()}
        super().__init__(model, make_optimizer(model, masks, cfg.optim), masks, cfg.optim.weight_decay)

    def _reshard(self) -> None:
        """Back to sharded parameters (the root keeps its own gathered after a forward)."""
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def local_numel(self) -> int:
        if not self.sharded:
            return super().local_numel()
        self._reshard()
        return sum(p.to_local().numel() for p in self.model.parameters())

    def bn_parameters(self) -> dict[str, torch.Tensor]:
        if not self.sharded:
            return super().bn_parameters()
        self._reshard()
        params = dict(self.model.named_parameters())
        return {name: params[name].detach().full_tensor() for name in self.bn_names}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.sharded:
            return super().full_state_dict()
        self._reshard()
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
