"""Sharded checkpoints: atomic, self-verifying, resumed from the newest complete one.

    RUN/checkpoints/step_00001000/
        state/        the engine's model + optimizer state (DCP shards, or DeepSpeed's files)
        rank{r}.pt    each rank's RNG states and data-loader state
        commit.json   the commit marker: written by rank 0 after every rank has written
A save goes to .tmp-step_.../ and is renamed after commit.json is on disk, so a directory
named step_* with a commit.json is complete. Frozen weights are left out unless
dist.save_frozen: they are regenerated from the seed and checked against the sha256 in
commit.json. Older checkpoints are deleted only after a newer one is committed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.api import CheckpointException

from bnonly_dist import dist

log = logging.getLogger(__name__)
# A single-process run saves without a process group, as intended: DCP's warning is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
COMMIT = "commit.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names it and the fix."""


class CheckpointIncompatible(CheckpointError):
    """Readable, but not for this run as configured; older checkpoints share the problem."""


class FrozenWeightsMismatch(CheckpointIncompatible):
    """The regenerated frozen weights are not the ones the checkpoint was trained with."""


def tensor_digest(named_tensors) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a whole model state (parameters and buffers): equal iff bit-identical."""
    return tensor_digest(state_dict.items())


def frozen_digest(model: torch.nn.Module) -> str:
    return tensor_digest((n, p) for n, p in model.named_parameters() if not p.requires_grad)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / COMMIT).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _rank_state(data_state: dict) -> dict:
    state = {"rng_cpu": torch.get_rng_state(), "data": data_state}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    return state


def _write_commit(folder: Path, meta: dict) -> None:
    with open(folder / COMMIT, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "another rank failed"
    if isinstance(error, CheckpointException) and error.failures:  # DCP wraps each rank's own error
        error = next(iter(error.failures.values()))[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def save(run_dir: Path, engine, rank: int, meta: dict, data_state: dict, keep: int, include_frozen: bool) -> Path:
    """Write a checkpoint of step meta['step'] (collective). meta goes into commit.json."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{meta['step']:08d}"
    if (final / COMMIT).is_file():
        return final  # already saved at this step (e.g. a stop signal right after a periodic save)
    tmp = folder / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    error = None
    try:
        engine.save(tmp / "state", include_frozen)
        torch.save(_rank_state(data_state), tmp / f"rank{rank}.pt")
    except (OSError, RuntimeError, CheckpointException) as err:  # torch.save reports a full disk as RuntimeError
        error = err
    if dist.any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the last good checkpoint stays
        raise CheckpointError(f"saving checkpoint {final} failed ({_reason(error)}); check free disk space and "
                              f"permissions in {folder} and start again: it resumes from {latest(run_dir) or 'scratch'}")
    if rank == 0:
        _write_commit(tmp, {**meta, "frozen_included": include_frozen, "torch": torch.__version__})
        if final.exists():  # no commit marker (checked above): not a checkpoint resume would ever use
            log.warning("replacing %s, which has no %s", final, COMMIT)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.glob(".tmp-step_*"):  # saves killed before their commit
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def read_commit(path: Path) -> dict:
    try:
        return json.loads((path / COMMIT).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable {COMMIT} ({err}); move it aside to "
                              "resume from the one before") from None


def load(path: Path, engine, rank: int, world: int, frozen_sha: str) -> tuple[dict, dict]:
    """Restore engine state and this rank's RNG in place: (commit meta, this rank's data state)."""
    meta = read_commit(path)
    if meta["world"] != world and not engine.reshardable:
        raise CheckpointIncompatible(f"{path} was written by {meta['world']} ranks and dist.engine={engine.name} "
                                     f"resumes only at the same world size; run it with {meta['world']} ranks, "
                                     "or use ddp/fsdp, which reshard")
    if meta["frozen_sha256"] != frozen_sha:
        if not meta["frozen_included"]:
            raise FrozenWeightsMismatch(
                f"{path}: the frozen weights regenerated from the seed differ from the ones this checkpoint was "
                "trained with (changed seed, model code or torch version?); resume with the original setup, or "
                "start a new run directory (dist.save_frozen=true stores them)")
        log.warning("%s: regenerated frozen weights differ; using the ones stored in the checkpoint", path)
    try:
        engine.load(path / "state", include_frozen=meta["frozen_included"])
        mine = path / f"rank{rank}.pt"
        rank_state = torch.load(mine, weights_only=True) if mine.is_file() else None
    except (Exception, CheckpointException) as err:  # damaged files raise many types; DCP's is a BaseException
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); move it aside to resume "
                              "from the one before") from None
    if rank_state is None:  # a rank the checkpoint did not have (larger world) keeps its own RNG
        return meta, {}
    torch.set_rng_state(rank_state["rng_cpu"])
    if "rng_cuda" in rank_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(rank_state["rng_cuda"])
    return meta, rank_state["data"]


def resume(run_dir: Path, engine, rank: int, world: int, frozen_sha: str):
    """Load the newest complete checkpoint every rank can read: (path, meta, data state), or None.

    A damaged one is skipped with an error in the log and left on disk; if none can be
    read the run stops instead of silently starting again from step 0.
    """
    folder = Path(run_dir) / "checkpoints"
    names = dist.broadcast_object([p.name for p in complete_checkpoints(run_dir)])  # one view for all ranks
    for name in reversed(names):
        error = None
        try:
            meta, data_state = load(folder / name, engine, rank, world, frozen_sha)
        except CheckpointIncompatible:
            raise
        except CheckpointError as err:
            error = err
        if dist.any_rank(error is not None):
            log.error("%s; trying the one before", error or f"checkpoint {folder / name} failed on another rank")
            continue
        return folder / name, meta, data_state
    if names:
        raise CheckpointError(f"none of the {len(names)} checkpoints in {folder} can be read (see logs/rank*.log); "
                              "restore them, or move them aside to start this run from scratch")
    return None


class Resumed(NamedTuple):
    path: Path  # the checkpoint loaded
    step: int  # optimizer steps done
    world: int  # ranks that wrote it
    frozen_sha: str  # the run's frozen-weight digest from now on (the stored weights' if they were saved)


class Checkpointer:
    """A run's checkpoints: built once from the run directory and what a checkpoint holds.

    The loop only says maybe_save(step) after each step, save(step, final=True) at the
    end or on a stop signal, and resume() at the start; when to save, what goes into the
    commit marker, retention and damaged checkpoints are decided here.
    """

    def __init__(self, run_dir: Path, rank: int, world: int, engine, source, frozen_sha: str, *, every: int,
                 keep: int, save_frozen: bool, steps_per_epoch: int, identity: dict):
        self.run_dir, self.rank, self.world = Path(run_dir), rank, world
        self.engine, self.source, self.frozen_sha = engine, source, frozen_sha
        self.every, self.keep, self.save_frozen = every, keep, save_frozen
        self.steps_per_epoch, self.identity = steps_per_epoch, identity

    def maybe_save(self, step: int) -> Path | None:
        """Save if step is on the train.checkpoint_every grid (collective on those steps)."""
        return self.save(step) if step % self.every == 0 else None

    def save(self, step: int, final: bool = False) -> Path:
        """A checkpoint of step (collective: every rank calls it after the same step)."""
        self.engine.sync_buffers()  # collective: rank 0's BN running statistics on every rank
        meta = {"step": step, "epoch": step // self.steps_per_epoch, "world": self.world,
                "engine": self.engine.name, "frozen_sha256": self.frozen_sha, "final": final,
                "identity": self.identity}
        return save(self.run_dir, self.engine, self.rank, meta, self.source.state(), self.keep, self.save_frozen)

    def resume(self) -> Resumed | None:
        """Load the newest usable checkpoint into the engine and the data source (collective)."""
        restored = resume(self.run_dir, self.engine, self.rank, self.world, self.frozen_sha)
        if not restored:
            return None
        path, meta, data_state = restored
        if meta["frozen_included"]:
            self.frozen_sha = meta["frozen_sha256"]  # the stored frozen weights are the run's now
        self.source.load_state(data_state)
        return Resumed(path, meta["step"], meta["world"], self.frozen_sha)
