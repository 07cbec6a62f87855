"""Step timing for the train log: loss and top-1 averages (of the global batch at log steps), images/s and
the time spent waiting for data."""
from __future__ import annotations

import time

import torch
import torch.distributed as torch_dist


class StepMeter:
    """Averages over the steps since the last report: loss, batch top-1, speed, data wait."""

    def __init__(self, device: torch.device, images_per_step: int):
        self.device, self.images_per_step = device, images_per_step
        self.reset()

    def reset(self) -> None:
        # Sums stay on the device so that a step never waits for the GPU.
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.steps, self.wait, self.start = 0, 0.0, time.perf_counter()

    def next_batch(self, batches):
        """The next batch (None at the end of the epoch), timing the wait for it."""
        tick = time.perf_counter()
        batch = next(batches, None)
        self.wait += time.perf_counter() - tick
        return batch

    def add(self, loss: torch.Tensor, batch_top1: torch.Tensor) -> None:
        self.loss += loss
        self.correct += batch_top1
        self.steps += 1

    def report(self, reset: bool = True, global_batch: bool = False) -> dict[str, float]:
        """Averages since the last reset (syncs the GPU: .item()); reset=False only peeks.

        global_batch: loss and top-1 of the whole global batch, not this rank's slice
        (collective: one all-reduce of the two sums; every rank must ask at the same step)."""
        elapsed = time.perf_counter() - self.start
        loss, correct = self.loss, self.correct
        if global_batch and torch_dist.is_initialized():
            sums = torch.stack([loss, correct])
            torch_dist.all_reduce(sums)
            loss, correct = sums / torch_dist.get_world_size()  # equal slices: the mean of the ranks' means
        values = {"loss": loss.item() / self.steps, "top1": 100 * correct.item() / self.steps,
                  "images_per_s": self.steps * self.images_per_step / elapsed, "data_wait_frac": self.wait / elapsed}
        if reset:
            self.reset()
        return values
