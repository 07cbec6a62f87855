"""The interface every engine offers the loop, and the single-process engine behind it.

An engine owns the model as the loop sees it: forward (`net`), one optimizer step, the
learning rate, the world-wide BN running statistics, and the model/optimizer part of a
checkpoint. ddp and fsdp store that part with torch.distributed.checkpoint (DCP), which
reshards on load, so their checkpoints resume at any world size.
"""
from __future__ import annotations

import contextlib

import torch
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
from bnonly_dist.models.bn_groups import average_running_statistics, restore_running_statistics


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

    @contextlib.contextmanager
    def world_bn_statistics(self):
        """Inside: every rank holds the world's mean of the BN running statistics (collective:
        one all-reduce), what one process holding every BN group would have: evaluations and
        checkpoints see that. Yields this rank's own, which come back on leaving, so the run
        goes on exactly as if nothing had happened (a resume on the same world is bit for bit)."""
        own = average_running_statistics(self.model)
        try:
            yield own
        finally:
            restore_running_statistics(self.model, own)

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
