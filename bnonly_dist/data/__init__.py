"""Data sources: one front door, build(), for ImageNet (DALI), CIFAR-10 and synthetic data.

Every source offers steps_per_epoch, num_classes, eval_size, train_epoch(epoch,
start_step) yielding this rank's (images, labels), eval_batches() yielding labels of -1
for padding, and state()/load_state() for what a resume needs beyond (epoch, step).
"""
from __future__ import annotations

import torch

from bnonly_dist.config import Config
from bnonly_dist.data.layout import DataError


def build(cfg: Config, rank: int, world: int, device: torch.device, channels_last: bool = False):
    """channels_last: the plan's layout; DALI then hands out channels_last batches without a copy."""
    data = cfg.data
    if data.name == "synthetic":
        from bnonly_dist.data.synthetic import SyntheticSource
        return SyntheticSource(data.synthetic_samples, data.synthetic_image_size, data.synthetic_classes,
                               data.batch_size, data.eval_batch_size, rank, world, cfg.seed, device)
    if not data.root:
        raise DataError(f"data.root is not set for data.name={data.name}; pass data.root=/path/to/{data.name}")
    if data.name == "cifar10":
        from bnonly_dist.data.cifar import CifarSource
        return CifarSource(data.root, data.batch_size, data.eval_batch_size, rank, world, cfg.seed, device)
    from bnonly_dist.data.dali import DaliImageNetSource
    decode = data.decode if data.decode != "auto" else ("mixed" if device.type == "cuda" else "cpu")
    if decode == "mixed" and device.type != "cuda":
        raise DataError("data.decode=mixed decodes on the GPU but this run is on the CPU; use data.decode=cpu")
    return DaliImageNetSource(data.root, data.batch_size, data.eval_batch_size, rank, world, cfg.seed, device,
                              decode, data.num_threads, data.image_size, data.resize_size, data.min_area,
                              channels_last)
