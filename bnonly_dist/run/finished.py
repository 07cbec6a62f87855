"""What "finished" means, in one place: a run is finished when it reached the last step its
config asks for, train.max_steps where that comes first, else the end of optim.epochs.

summary.json's "finished" says so of the config the summary was written under. A later start
may ask for more (train.max_steps is not part of a run's identity, so a 3-step trial can be
resumed to the full run), so whoever holds a config decides with reached_end(): train's
"nothing to do", `bnonly analyze` (with the run's config.yaml), a sweep's "finished" and a
Slurm task's requeue after a stop all agree. Torch-free: launchers import it.
"""
from __future__ import annotations

from bnonly_dist.config import Config


def reached_end(summary: dict, cfg: Config) -> bool:
    """True if the summary's step is the last step cfg asks for (or beyond it)."""
    step, epoch = summary.get("step"), summary.get("epoch")
    if not isinstance(step, int):
        return False
    if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
        return True
    # epoch = step / steps_per_epoch (exact for whole epochs): the summary's own record of how far it got
    return isinstance(epoch, (int, float)) and epoch >= cfg.optim.epochs


def end_of(cfg: Config) -> str:
    """The end cfg asks for, in the words of its keys (for messages)."""
    epochs = f"optim.epochs={cfg.optim.epochs}"
    return epochs if cfg.train.max_steps is None else f"train.max_steps={cfg.train.max_steps} or {epochs}"
