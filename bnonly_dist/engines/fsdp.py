"""FSDP2 (`fully_shard`): parameters, frozen ones included, are sharded across ranks and
gathered one residual block (or stage) at a time. Pays off only for nets too wide to
replicate; the math is the same as DDP's."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from bnonly_dist.config import Config
from bnonly_dist.config.plan import Plan
from bnonly_dist.dist import Context
from bnonly_dist.engines.base import Engine, contiguous_parameters
from bnonly_dist.engines.optim import make_optimizer


def shard_units(model: torch.nn.Module, unit: str) -> list[torch.nn.Module]:
    """The residual stages (layer1..), or the blocks inside them, in forward order."""
    stages = model.stages()
    return stages if unit == "stage" else [block for stage in stages for block in stage]


def batch_norms(module: torch.nn.Module, taken: set) -> list[torch.nn.Module]:
    """The BN layers under module not yet given to a shard group."""
    found = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m not in taken]
    taken.update(found)
    return found


def shard(model: torch.nn.Module, units: list[torch.nn.Module], mesh, bf16: bool) -> None:
    """fully_shard each unit, then the root (the stem, the head and whatever is left).

    Under bf16 the convolution and linear weights are all-gathered in bf16 (half the bytes;
    autocast would cast them for every convolution anyway) and gradients reduced in fp32.
    The BN affine parameters stay fp32, as autocast leaves them: each unit's BN layers form
    a group of their own without a cast (one more small all-gather and reduce-scatter per
    unit, both collectives on the data-parallel mesh).
    """
    contiguous_parameters(model)  # fully_shard refuses channels_last weights
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    taken: set = set()
    for unit in [*units, model]:
        norms = batch_norms(unit, taken) if bf16 else []
        if norms:
            fully_shard(norms, mesh=mesh)
        fully_shard(unit, mesh=mesh, mp_policy=policy)


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, model: torch.nn.Module, masks: dict, cfg: Config, plan: Plan, ctx: Context):
        self.sharded = ctx.world > 1  # one process: nothing to shard, same checkpoints
        if self.sharded:
            mesh = init_device_mesh(ctx.device.type, (ctx.world,))
            shard(model, shard_units(model, cfg.dist.fsdp_unit), mesh, plan.bf16)
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
