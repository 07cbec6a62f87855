"""Data sources: one front door, build(), for ImageNet (DALI), CIFAR-10 and synthetic data.

Every source offers steps_per_epoch, num_classes, eval_size, train_epoch(epoch,
start_step) yielding this rank's (images, labels), eval_batches() yielding labels of -1
for padding, and state()/load_state() for what a resume needs beyond (epoch, step).
"""
from __future__ import annotations

from pathlib import Path

from bnonly_dist.config import Config, ConfigError
from bnonly_dist.config.plan import Plan
from bnonly_dist.data.layout import DataError  # noqa: F401  (raised by the sources; importable from here)
from bnonly_dist.data.threads import dali_threads


def require_root(cfg: Config) -> None:
    """A data set on disk needs data.root: a config error (exit 2), checked before anything else is asked."""
    if cfg.data.name != "synthetic" and not cfg.data.root:
        raise ConfigError(f"data.root is not set for data.name={cfg.data.name}; "
                          f"pass data.root=/path/to/{cfg.data.name}")


def build(cfg: Config, plan: Plan, rank: int, world: int):
    """This rank's source; DALI hands out batches in the plan's memory format without a copy."""
    data, device = cfg.data, plan.device
    if data.name == "synthetic":
        from bnonly_dist.data.synthetic import SyntheticSource
        return SyntheticSource(data.synthetic_samples, data.synthetic_image_size, data.synthetic_classes,
                               data.batch_size, data.eval_batch_size, rank, world, cfg.seed, device)
    require_root(cfg)
    if data.name == "cifar10":
        from bnonly_dist.data.cifar import CifarSource
        return CifarSource(data.root, data.batch_size, data.eval_batch_size, rank, world, cfg.seed, device)
    from bnonly_dist.data.dali import DaliImageNetSource
    return DaliImageNetSource(data.root, data.batch_size, data.eval_batch_size, rank, world, cfg.seed, device,
                              plan.decode, dali_threads(data.num_threads), data.image_size, data.resize_size, data.min_area,
                              plan.channels_last)


def identity_of(cfg: Config, source) -> dict | None:
    """What the data set is (data/identity.py), for the run's record; None for synthetic data (the config says it
    all). ImageNet costs a stat per file: call it on one rank."""
    if cfg.data.name == "synthetic":
        return None
    if cfg.data.name == "cifar10":
        return source.identity
    from bnonly_dist.data.identity import of_listing
    return of_listing("imagenet", cfg.data.root, source.classes, source.train_items, source.val_items)


def describe(cfg: Config, plan: Plan) -> str:
    """The data path in use, for the start-up log."""
    data = cfg.data
    if data.name == "synthetic":
        return f"data: synthetic images drawn on {plan.device} from (seed, step)"
    if data.name == "cifar10":
        from bnonly_dist.data.layout import cifar10_dir
        folder = cifar10_dir(data.root)
        where = (" (the files lie in data.root itself, not in data.root/cifar-10-batches-py: accepted)"
                 if folder == Path(data.root) else "")
        return (f"data: CIFAR-10 from {folder}{where}, held on {plan.device} as uint8; crop and flip on "
                f"{plan.device}")
    return (f"data: ImageNet from {data.root} via DALI, JPEG decode {plan.decode} "
            f"({'GPU' if plan.decode == 'mixed' else 'CPU'}), {dali_threads(data.num_threads)} CPU threads per rank")
