"""Random images drawn on the device from (seed, step): no I/O, for benchmarks and tests."""
from __future__ import annotations

from typing import Iterator

import torch

from bnonly_dist.data import sharding
from bnonly_dist.models.init import name_seed
from bnonly_dist.config.plan import per_rank


class SyntheticSource:
    def __init__(self, samples: int, image_size: int, num_classes: int, global_batch: int,
                 eval_batch: int, rank: int, world: int, seed: int, device: torch.device):
        self.num_classes, self.image_size = num_classes, image_size
        self.local_batch = per_rank(global_batch, world)
        self.steps_per_epoch = max(1, samples // global_batch)
        self.eval_size = max(1, samples // 4)
        self.eval_local_batch = max(1, eval_batch // world)
        self.rank, self.world, self.seed, self.device = rank, world, seed, device

    def _batch(self, key: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator(self.device).manual_seed(name_seed(self.seed, key))
        images = torch.randn(size, 3, self.image_size, self.image_size, generator=generator, device=self.device)
        labels = torch.randint(0, self.num_classes, (size,), generator=generator, device=self.device)
        return images, labels

    def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(start_step, self.steps_per_epoch):
            yield self._batch(f"synthetic/{epoch}/{step}/{self.rank}", self.local_batch)

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, valid = sharding.rank_eval_indices(self.eval_size, self.rank, self.world)
        valid = torch.from_numpy(valid).to(self.device)  # one copy, then slices on the device
        for lo in range(0, len(valid), self.eval_local_batch):
            ok = valid[lo:lo + self.eval_local_batch]
            images, labels = self._batch(f"synthetic/eval/{lo}/{self.rank}", len(ok))
            yield images, torch.where(ok, labels, -1)

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass
