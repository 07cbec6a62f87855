"""The interface every engine offers the loop, and the single-process engine behind it.

An engine owns the model as the loop sees it: forward (`net`), one optimizer step, the
learning rate, BN buffer agreement across ranks, and the model/optimizer part of a
checkpoint. ddp and fsdp store that part with torch.distributed.checkpoint (DCP), which
reshards on load, so their checkpoints resume at any world size.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from bnonly_dist import modes
from bnonly_dist.models import parameter_roles


def contiguous_parameters(model: torch.nn.Module) -> None:
    """Parameters back to NCHW strides where channels_last changed them: FSDP's fully_shard
    refuses non-contiguous parameters and DeepSpeed views them as flat bytes, which needs a
    last stride of 1 (a channels_last 1x1 weight counts as contiguous but has not got one).
    Activations stay channels_last (the plan's memory format); cuDNN takes either weight layout."""
    for param in model.parameters():
        if not param.is_contiguous() or (param.dim() and param.stride(-1) != 1):
            param.data = param.data.clone(memory_format=torch.contiguous_format)


class Engine:
    """One process, no wrapper: the reference the distributed engines must match."""

    name = "single"
    reshardable = True  # loads checkpoints written at another world size

    def __init__(self, model: torch.nn.Module, optimizer, masks: dict, weight_decay: float):
        self.model, self.optimizer, self.masks, self.weight_decay = model, optimizer, masks, weight_decay
        self.net = model  # what forward and evaluation call
        self.frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
        self.bn_names = [n for n, role in parameter_roles(model).items() if role == "bn"]

    def compile(self) -> None:
        self.net = torch.compile(self.net)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups if self.optimizer else []:
            group["lr"] = lr

    def train_step(self, images, labels, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, masked gradients, SGD step: (loss, top-1 fraction) of this rank's batch."""
        with autocast(), torch.set_grad_enabled(self.optimizer is not None):
            logits = self.net(images)
            loss = F.cross_entropy(logits.float(), labels)
        if self.optimizer is not None:
            self.update(loss)
        return loss.detach(), (logits.argmax(1) == labels).float().mean()

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        modes.mask_gradients(self.model, self.masks, self.weight_decay)
        self.optimizer.step()

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """BN running statistics of rank 0 on every rank (what DDP does before each forward).

        Training uses batch statistics, so this only makes evaluation and checkpoints
        identical across ranks and engines.
        """
        if torch_dist.is_initialized():
            for buffer in self.model.buffers():
                torch_dist.broadcast(buffer, src=0)

    # --- checkpoints -----------------------------------------------------------------
    def _dcp_state(self, include_frozen: bool) -> dict:
        model = get_model_state_dict(self.model)
        state = {"model": {k: v for k, v in model.items() if include_frozen or k not in self.frozen_names}}
        if self.optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def save(self, folder, include_frozen: bool) -> None:
        """Write model and optimizer state into folder (collective)."""
        dcp.save(self._dcp_state(include_frozen), checkpoint_id=folder)

    def load(self, folder, include_frozen: bool) -> None:
        """Restore model and optimizer state from folder in place (collective)."""
        state = self._dcp_state(include_frozen)
        dcp.load(state, checkpoint_id=folder, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])

    def local_numel(self) -> int:
        """Parameter numbers held by this rank (all of them unless the engine shards)."""
        return sum(p.numel() for p in self.model.parameters())

    def bn_parameters(self) -> dict[str, torch.Tensor]:
        """The BN affine parameters, whole, on every rank (collective under sharding)."""
        params = dict(self.model.named_parameters())
        return {name: params[name].detach() for name in self.bn_names}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, unsharded, on rank 0 (collective; others may get {})."""
        return self.model.state_dict()
