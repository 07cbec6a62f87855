"""Which sample goes to which rank at which step, as pure functions of (seed, epoch, step).

Training: one permutation per epoch over the whole set; step s uses the global batch
perm[s*B:(s+1)*B], and rank r takes the r-th contiguous slice of it. The last partial
global batch is dropped. So every image is seen at most once per epoch across ranks,
and the data position is just (epoch, step), whatever the world size.
Evaluation: rank r takes the r-th contiguous slice of the set, padded to equal length
with label -1 (ignored when counting), so each image is counted exactly once.
"""
from __future__ import annotations

import math

import numpy as np

from bnonly_dist.config import ConfigError
from bnonly_dist.config.plan import per_rank
from bnonly_dist.models.init import name_seed


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(name_seed(seed, f"data/epoch{epoch}")).permutation(num_samples)


def rank_train_indices(perm: np.ndarray, global_batch: int, rank: int, world: int,
                       start_step: int = 0) -> np.ndarray:
    """This rank's sample indices for steps start_step.. of the epoch, in order."""
    local = per_rank(global_batch, world)
    steps = len(perm) // global_batch
    batches = perm[: steps * global_batch].reshape(steps, world, local)
    return batches[start_step:, rank].reshape(-1)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    if global_batch > num_samples:
        raise ConfigError(f"data.batch_size={global_batch} exceeds the {num_samples} training images; lower it")
    return num_samples // global_batch


def rank_eval_indices(num_samples: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, valid) for this rank; padding repeats index 0 with valid = False."""
    shard = math.ceil(num_samples / world)
    indices = np.arange(rank * shard, (rank + 1) * shard)
    valid = indices < num_samples
    return np.where(valid, indices, 0), valid
