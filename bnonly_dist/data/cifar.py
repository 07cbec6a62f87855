"""CIFAR-10 held on the device as uint8; crop 32 with padding 4 and flip done on the device.

The augmentation of a global batch is drawn from (seed, epoch, step) before it is split
among ranks, so a resumed or resharded run sees exactly the same pixels.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from bnonly_dist.data import sharding
from bnonly_dist.data.layout import load_cifar10
from bnonly_dist.models.init import name_seed

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def augment(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop 32x32 at offsets (b, 2) from the zero-padded 40x40 image, mirrored where flips."""
    b = images.shape[0]
    padded = F.pad(images, (4, 4, 4, 4))
    span = torch.arange(32, device=images.device)
    rows = offsets[:, :1] + span
    cols = offsets[:, 1:] + span
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(3, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class CifarSource:
    num_classes = 10

    def __init__(self, root: str, global_batch: int, eval_batch: int, rank: int, world: int,
                 seed: int, device: torch.device):
        splits = load_cifar10(root)
        self.device, self.seed, self.rank, self.world = device, seed, rank, world
        self.global_batch = global_batch
        self.local_batch = sharding.per_rank(global_batch, world)
        self.eval_local_batch = max(1, eval_batch // world)
        self.train_images = torch.from_numpy(splits["train"][0]).to(device)
        self.train_labels = torch.from_numpy(splits["train"][1]).to(device)
        self.test_images = torch.from_numpy(splits["test"][0]).to(device)
        self.test_labels = torch.from_numpy(splits["test"][1]).to(device)
        self.steps_per_epoch = sharding.steps_per_epoch(len(self.train_labels), global_batch)
        self.eval_size = len(self.test_labels)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = sharding.epoch_permutation(len(self.train_labels), self.seed, epoch)
        indices = sharding.rank_train_indices(perm, self.global_batch, self.rank, self.world, start_step)
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for i, step in enumerate(range(start_step, self.steps_per_epoch)):
            generator = torch.Generator().manual_seed(name_seed(self.seed, f"cifar/augment/{epoch}/{step}"))
            offsets = torch.randint(0, 9, (self.global_batch, 2), generator=generator)[lo:hi]
            flips = (torch.rand(self.global_batch, generator=generator) < 0.5)[lo:hi]
            idx = torch.from_numpy(indices[i * self.local_batch:(i + 1) * self.local_batch]).to(self.device)
            images = augment(self.train_images[idx], offsets.to(self.device), flips.to(self.device))
            yield self._normalize(images), self.train_labels[idx]

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, valid = sharding.rank_eval_indices(self.eval_size, self.rank, self.world)
        for lo in range(0, len(indices), self.eval_local_batch):
            idx = torch.from_numpy(indices[lo:lo + self.eval_local_batch]).to(self.device)
            ok = torch.from_numpy(valid[lo:lo + self.eval_local_batch]).to(self.device)
            labels = torch.where(ok, self.test_labels[idx], -1)
            yield self._normalize(self.test_images[idx]), labels

    def state(self) -> dict:
        return {}  # everything derives from (seed, epoch, step)

    def load_state(self, state: dict) -> None:
        pass
