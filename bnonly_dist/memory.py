"""What a training step keeps for backward, and what memory a rank has: the inputs of
train.lean_autograd=auto (plan.py).

The estimate runs the network's forward on the meta device (shapes only: no memory, no
compute; 0.1-0.4 s for ResNet-50 to ResNet-200) under saved-tensor hooks, counting each
kept storage once, exactly as `bnonly bench` counts real ones.
"""
from __future__ import annotations

import os

import torch

from bnonly_dist import models, modes
from bnonly_dist.catalog import parse_arch


def plain_saved_bytes(arch: str, classes: int, mode: str, batch: int, image_size: int, channels_last: bool,
                      checkpointed_stages=(), bf16: bool = False) -> int:
    """Bytes plain autograd keeps for backward in one step of `batch` images (one rank).

    Counted in fp32; under bf16 autocast the kept activations are bf16, so half (the few
    fp32 BN statistics are negligible)."""
    model = models.create(arch, classes, device="meta")
    modes.apply(model, mode, seed=0)  # requires_grad per mode: what autograd keeps depends on it
    models.set_memory_options(model, False, checkpointed_stages)
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return tensor

    side = 32 if parse_arch(arch).family == "cifar" else image_size
    images = torch.empty(batch, 3, side, side, device="meta")
    labels = torch.empty(batch, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        torch.nn.functional.cross_entropy(model(images), labels)
    return sum(kept.values()) // (2 if bf16 else 1)


def rank_memory_bytes(device: torch.device) -> int | None:
    """Memory one rank may use: its GPU's, or this host's RAM shared by the ranks on it;
    None where it cannot be read (no GPU visible where the plan asks for one)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(device).total_memory
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(1, ranks_here)
