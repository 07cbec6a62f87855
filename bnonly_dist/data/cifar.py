"""CIFAR-10 held on the device as uint8; crop 32 with padding 4 and flip done on the device.

The augmentation of a global batch is drawn from (seed, epoch, step) before it is split
among ranks, so a resumed or resharded run sees exactly the same pixels. A whole epoch's
sample indices, crop offsets and flips are drawn at its start and reach the device in
one copy (pinned, non-blocking); each step slices them there, so a step neither waits
for the host nor copies anything to the device.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from bnonly_dist.data import identity, sharding
from bnonly_dist.data.layout import load_cifar10
from bnonly_dist.models.init import name_seed
from bnonly_dist.config.plan import per_rank

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
        self.identity = identity.of_arrays("cifar10", self.num_classes, splits["train"], splits["test"])
        self.device, self.seed, self.rank, self.world = device, seed, rank, world
        self.global_batch = global_batch
        self.local_batch = per_rank(global_batch, world)
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

    def _to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """One host-to-device copy of tensors (packed as int64), pinned so it does not block."""
        flat = torch.cat([t.reshape(-1).long() for t in tensors])
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)  # the pinned allocator keeps the buffer until copied
        return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def epoch_plan(self, epoch: int, start_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's (indices, offsets, flips) for steps start_step.. of epoch, on the host,
        shaped (steps, local batch, ...). Each step's draws come from its own generator, so
        they are the same whatever step an epoch starts at."""
        perm = sharding.epoch_permutation(len(self.train_labels), self.seed, epoch)
        indices = sharding.rank_train_indices(perm, self.global_batch, self.rank, self.world, start_step)
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        offsets, flips = [], []
        for step in range(start_step, self.steps_per_epoch):
            generator = torch.Generator().manual_seed(name_seed(self.seed, f"cifar/augment/{epoch}/{step}"))
            offsets.append(torch.randint(0, 9, (self.global_batch, 2), generator=generator)[lo:hi])
            flips.append((torch.rand(self.global_batch, generator=generator) < 0.5)[lo:hi])
        steps = self.steps_per_epoch - start_step
        return (torch.from_numpy(indices).view(steps, self.local_batch),
                torch.stack(offsets) if offsets else torch.zeros(0, self.local_batch, 2, dtype=torch.long),
                torch.stack(flips) if flips else torch.zeros(0, self.local_batch, dtype=torch.bool))

    def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, offsets, flips = self._to_device(*self.epoch_plan(epoch, start_step))
        flips = flips.bool()
        for i in range(len(indices)):  # slices of device tensors: no host sync, no copy
            idx = indices[i]
            images = augment(self.train_images[idx], offsets[i], flips[i])
            yield self._normalize(images), self.train_labels[idx]

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, valid = sharding.rank_eval_indices(self.eval_size, self.rank, self.world)
        indices, valid = self._to_device(torch.from_numpy(indices), torch.from_numpy(valid))
        for lo in range(0, len(indices), self.eval_local_batch):
            idx, ok = indices[lo:lo + self.eval_local_batch], valid[lo:lo + self.eval_local_batch].bool()
            labels = torch.where(ok, self.test_labels[idx], -1)
            yield self._normalize(self.test_images[idx]), labels

    def state(self) -> dict:
        return {}  # everything derives from (seed, epoch, step)

    def load_state(self, state: dict) -> None:
        pass
