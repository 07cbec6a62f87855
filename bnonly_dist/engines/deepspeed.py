"""DeepSpeed ZeRO: stage 1 shards optimizer state, 2 also gradients, 3 also the parameters
(frozen ones included). Checkpoints use DeepSpeed's own format, which resumes only at the
world size that wrote it."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as torch_dist

from bnonly_dist.config import Config, ConfigError
from bnonly_dist.config.plan import Plan
from bnonly_dist.dist import Context, device_local_rank
from bnonly_dist.engines.base import Engine, contiguous_parameters
from bnonly_dist.engines.optim import make_optimizer

TAG = "engine"  # the one DeepSpeed tag inside each of our checkpoint directories


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("dist.engine=deepspeed needs DeepSpeed: pip install 'bnonly-dist[deepspeed]'") from None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def ds_config(cfg: Config, plan: Plan, world: int) -> dict:
    """DeepSpeed's config for cfg under plan.

    DeepSpeed runs the engine's forward under its own `torch_autocast` setting and turns an
    autocast opened outside it off (deepspeed/runtime/torch_autocast.py), so the loop's
    bf16 would silently become fp32 on GPU. The plan's precision is therefore given here.
    No module is listed as lower-precision-safe: gradients are reduced in fp32, as DDP
    does; the `bf16` section (bf16 weights with fp32 master copies) is not used, the
    weights stay as the plan stores them.
    """
    return {"train_batch_size": cfg.data.batch_size,
            "train_micro_batch_size_per_gpu": cfg.data.batch_size // world,
            "gradient_accumulation_steps": 1,
            # BN-only gradients are small: DeepSpeed's default 5e8-element buckets only waste memory
            "zero_optimization": {"stage": cfg.dist.zero_stage, "reduce_bucket_size": 10**7,
                                  "allgather_bucket_size": 10**7},
            "torch_autocast": {"enabled": plan.bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
            "zero_allow_untested_optimizer": True,  # our torch.optim.SGD
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    reshardable = False

    def __init__(self, model: torch.nn.Module, masks: dict, cfg: Config, plan: Plan, ctx: Context):
        # masks and modes that train nothing are refused by the config validator (config.py)
        optimizer = make_optimizer(model, masks, cfg.optim)
        deepspeed = _deepspeed()
        if not torch_dist.is_initialized():  # DeepSpeed always wants a process group
            # gloo serves the host-side agreements (dist.any_rank) on CPU tensors, nccl the GPU
            backend = "cpu:gloo,cuda:nccl" if ctx.device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
        # DeepSpeed calls set_device(LOCAL_RANK) and asserts the variable exists: give it the
        # device this process chose (a single process without a launcher has none).
        os.environ["LOCAL_RANK"] = device_local_rank(ctx.device, ctx.local_rank)
        contiguous_parameters(model)  # DeepSpeed broadcasts parameters as flat bytes
        self.ds_engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                               config=ds_config(cfg, plan, ctx.world))
        super().__init__(model, ds_optimizer, masks, cfg.optim.weight_decay)
        self.net = self.ds_engine
        self.zero3 = cfg.dist.zero_stage == 3

    def update(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss)
        self.ds_engine.step()

    def save(self, folder, include_frozen: bool) -> None:
        self.ds_engine.save_checkpoint(str(folder), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=not include_frozen)

    def load(self, folder, include_frozen: bool) -> None:
        path, _ = self.ds_engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=False,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}/{TAG}")

    def compile(self) -> None:
        self.ds_engine.compile()

    def local_numel(self) -> int:
        if not self.zero3:
            return super().local_numel()
        return sum(p.ds_tensor.numel() for p in self.model.parameters())  # this rank's partition

    def bn_parameters(self) -> dict[str, torch.Tensor]:
        if not self.zero3:
            return super().bn_parameters()
        params = dict(self.model.named_parameters())
        with _deepspeed().zero.GatheredParameters([params[n] for n in self.bn_names]):
            return {name: params[name].detach().clone() for name in self.bn_names}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.zero3:
            return self.model.state_dict()
        deepspeed = _deepspeed()
        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
