"""Sharded checkpoints: atomic, self-verifying, resumed from the newest good one.

    RUN/checkpoints/step_00001000/
        state/        the engine's model + optimizer state (DCP shards, or DeepSpeed's files)
        rank{r}.pt    each rank's RNG states, data-loader state and own BN running statistics
        commit.json   the commit marker: written by rank 0 after every rank has written; it
                      lists the size and sha256 of every file above (checkpoint_files.py)
A save goes to .tmp-step_.../ and is renamed after commit.json is on disk, so a directory
named step_* with a commit.json is complete unless damaged later; resume verifies it
before loading and moves a damaged one aside (step_X.damaged). Frozen weights are left
out unless dist.save_frozen: they are regenerated from the seed and checked against the
sha256 in commit.json. An older checkpoint is deleted only after a newer one is committed
and verified, and never the newest good one.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.api import CheckpointException

from bnonly_dist import dist
from bnonly_dist.models.bn_groups import restore_running_statistics
from bnonly_dist.run.checkpoint_files import (
    COMMIT,
    CheckpointDamaged,
    CheckpointError,
    committed,
    damaged,
    fsync_dir,
    latest,
    latest_good,
    move_aside,
    read_marker,
    step_dir,
    step_of,
    verify,
    write_marker,
)
from bnonly_dist.run.rundir import differences

__all__ = ["COMMIT", "CheckpointDamaged", "CheckpointError", "CheckpointIncompatible", "Checkpointer",
           "FrozenWeightsMismatch", "Resumed", "complete_checkpoints", "fingerprint", "frozen_digest", "latest",
           "latest_good", "load", "read_commit", "resume", "save", "tensor_digest"]
log = logging.getLogger(__name__)
# A single-process run saves without a process group, as intended: DCP's warning is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


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


def _folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints (step_* with a marker), oldest first; not verified."""
    return committed(_folder(run_dir))


def read_commit(path: Path) -> dict:
    """The marker of a checkpoint; CheckpointDamaged (a CheckpointError) if unreadable or incomplete."""
    try:
        return read_marker(path)
    except CheckpointDamaged as err:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {err}; move it aside to resume from the one "
                                "before") from None


def _rank_state(data_state: dict, bn_running: list[torch.Tensor]) -> dict:
    state = {"rng_cpu": torch.get_rng_state(), "data": data_state, "bn_running": bn_running}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    return state


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "another rank failed"
    if isinstance(error, CheckpointException) and error.failures:  # DCP wraps each rank's own error
        error = next(iter(error.failures.values()))[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


FULL_BELOW = 1 << 20  # bytes free under which a failed write is put down to a full disk


def _disk_full(error: BaseException, folder: Path) -> BaseException:
    """error, or an OSError saying the disk is full where it is (torch.save's zip writer may report a full disk
    as "unexpected pos ..." without the errno)."""
    if isinstance(error, OSError) and error.errno is not None:
        return error
    try:
        full = shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        full = False
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({_reason(error)})") if full else error


def _retain(folder: Path, newest: Path, keep: int) -> None:
    """Delete checkpoints older than newest beyond keep (rank 0, after newest is verified).

    Older ones are size-checked first: a damaged one is moved aside and not counted.
    """
    kept = 1  # newest itself
    for old in reversed(committed(folder)):
        if step_of(old) >= step_of(newest):
            continue
        try:
            verify(old, checksums=False)
        except CheckpointDamaged as err:
            move_aside(old, str(err))
            continue
        if kept < keep:
            kept += 1
        else:  # renamed first: a kill halfway through the delete leaves no half checkpoint named step_*
            doomed = folder / f".tmp-{old.name}.old"
            old.replace(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def save(run_dir: Path, engine, rank: int, meta: dict, data_state: dict, keep: int, include_frozen: bool,
         bn_running: list[torch.Tensor] = ()) -> Path:
    """Write a checkpoint of step meta['step'] (collective). meta goes into commit.json.

    The engine's state holds the world's mean of the BN running statistics (what any world
    resumes from); bn_running, this rank's own, goes into rank{r}.pt for a resume on the same
    world, which then goes on bit for bit."""
    folder = _folder(run_dir)
    final = step_dir(folder, meta["step"])
    tmp = folder / f".tmp-{final.name}"
    done, failed = False, None
    if rank == 0:
        try:  # rank 0 alone touches the folder; its verdict reaches every rank below
            if (final / COMMIT).is_file():  # e.g. a stop signal right after a periodic save of this step
                try:
                    verify(final, checksums=False)
                    done = True
                except CheckpointDamaged as err:
                    move_aside(final, str(err))  # never let a damaged folder stand for a new save
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as err:
            failed = _reason(err)
    done, failed = dist.broadcast_object((done, failed))  # collective: every rank learns rank 0's view
    if failed:
        raise CheckpointError(f"saving checkpoint {final} failed on rank 0 ({failed}); check free disk space and "
                              f"permissions in {folder} and start again: it resumes from {latest(run_dir) or 'scratch'}")
    if done:
        return final
    error = None
    try:
        engine.save(tmp / "state", include_frozen)
        torch.save(_rank_state(data_state, list(bn_running)), tmp / f"rank{rank}.pt")
    except (OSError, RuntimeError, CheckpointException) as err:  # torch.save reports a full disk as RuntimeError
        error = _disk_full(err, tmp)
    if not dist.any_rank(error is not None) and rank == 0:  # collective: every rank's files are written
        try:  # the marker (hashing and fsyncing every file), then the rename that commits it
            write_marker(tmp, {**meta, "frozen_included": include_frozen, "torch": torch.__version__})
            if final.exists():  # no commit marker (checked above): not a checkpoint resume would ever use
                log.warning("replacing %s, which has no %s", final, COMMIT)
                shutil.rmtree(final)
            tmp.replace(final)
            fsync_dir(folder)
        except OSError as err:
            error = err
    if dist.any_rank(error is not None):  # collective: rank 0's commit succeeded, or nobody goes on
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the last good checkpoint stays
        raise CheckpointError(f"saving checkpoint {final} failed ({_reason(error)}); check free disk space and "
                              f"permissions in {folder} and start again: it resumes from {latest(run_dir) or 'scratch'}")
    damaged = None
    if rank == 0:
        try:
            verify(final, checksums=False)  # what retention relies on: the new one is complete where it lies
            _retain(folder, final, keep)
            for stale in folder.glob(".tmp-step_*"):  # saves killed before their commit
                shutil.rmtree(stale, ignore_errors=True)
        except CheckpointDamaged as err:  # older checkpoints were kept
            damaged = err
        except OSError as err:  # retention could not delete: the new checkpoint is good, the run goes on
            log.error("after saving %s: %s; older checkpoints were kept", final, _reason(err))
    # collective: nobody goes on before the checkpoint is committed, and all learn if it is not good
    verdict = dist.broadcast_object(str(damaged) if damaged else None)
    if verdict:
        raise damaged or CheckpointError(verdict)
    return final


def _check_identity(path: Path, meta: dict, identity: dict | None) -> None:
    stored = meta.get("identity")
    if identity is None or not isinstance(stored, dict):
        return  # markers from before identities were recorded
    differs = differences(stored, identity, stored.keys() & identity.keys())
    if differs:
        raise CheckpointIncompatible(f"{path} was written by a run with {differs}; pass the original settings or a "
                                     "new --run-dir")


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
    if rank_state.get("bn_running") and meta["world"] == world:  # this rank's own groups' running statistics
        restore_running_statistics(engine.model, rank_state["bn_running"])
    return meta, rank_state["data"]


def _newest_verified(folder: Path) -> str | None:
    """Rank 0: the newest checkpoint whose files match its marker; damaged newer ones are moved aside."""
    for path in reversed(committed(folder)):
        try:
            verify(path)
            return path.name
        except CheckpointDamaged as err:
            move_aside(path, str(err), "; trying the one before")
    return None


def resume(run_dir: Path, engine, rank: int, world: int, frozen_sha: str, identity: dict | None = None):
    """Load the newest good checkpoint: (path, meta, data state), or None if the run has none (collective).

    Rank 0 verifies (sizes and checksums) and moves a damaged checkpoint aside; one that
    verifies but fails to load on any rank is moved aside too. If there were checkpoints
    and none is usable, the run stops instead of silently starting again from step 0.
    """
    folder = _folder(run_dir)
    while True:
        name = dist.broadcast_object(_newest_verified(folder) if rank == 0 else None)  # one view for all ranks
        if name is None:
            break
        error = None
        try:
            _check_identity(folder / name, read_commit(folder / name), identity)
            meta, data_state = load(folder / name, engine, rank, world, frozen_sha)
        except CheckpointIncompatible:
            raise
        except CheckpointError as err:
            error = err
        if dist.any_rank(error is not None):  # collective: the same verdict on every rank
            if rank == 0:
                move_aside(folder / name, str(error or "it failed to load on another rank"), "; trying the one before")
            dist.barrier()
            continue
        return folder / name, meta, data_state
    aside = damaged(folder)
    if aside:
        raise CheckpointError(f"none of the {len(aside)} checkpoints in {folder} can be read (moved aside: "
                              f"{', '.join(p.name for p in aside[:3])}; see logs/rank0.log); restore them, or "
                              "delete them to start this run from scratch")
    return None


class Resumed(NamedTuple):
    path: Path  # the checkpoint loaded
    step: int  # optimizer steps done
    world: int  # ranks that wrote it
    frozen_sha: str  # the run's frozen-weight digest from now on (the stored weights' if they were saved)
    wall_time_s: float  # the run's training time up to this checkpoint, over every part before (0 if not recorded)
    parts: int  # starts of the run that led to this checkpoint (1: saved by an uninterrupted run)


class Checkpointer:
    """A run's checkpoints: built once from the run directory and what a checkpoint holds.

    The loop only says maybe_save(step) after each step, save(step, final=True) at the
    end or on a stop signal, and resume() at the start; when to save, what goes into the
    commit marker, verification, retention and damaged checkpoints are decided here.
    """

    def __init__(self, run_dir: Path, rank: int, world: int, engine, source, frozen_sha: str, *, every: int,
                 keep: int, save_frozen: bool, steps_per_epoch: int, identity: dict, before_save=None, clock=None):
        """before_save(): called on every rank before each save; raises to refuse it (e.g. a diverged run).
        clock(): (training time so far over all parts, parts so far), recorded in each commit.json."""
        self.run_dir, self.rank, self.world = Path(run_dir), rank, world
        self.before_save, self.clock = before_save, clock
        self.engine, self.source, self.frozen_sha = engine, source, frozen_sha
        self.every, self.keep, self.save_frozen = every, keep, save_frozen
        self.steps_per_epoch, self.identity = steps_per_epoch, identity
        self.last_saved: Path | None = None

    def maybe_save(self, step: int) -> Path | None:
        """Save if step is on the train.checkpoint_every grid (collective on those steps)."""
        return self.save(step) if step % self.every == 0 else None

    def save(self, step: int, final: bool = False) -> Path:
        """A checkpoint of step (collective: every rank calls it after the same step)."""
        if self.last_saved is not None and step_of(self.last_saved) == step:  # e.g. a stop right after a save
            return self.last_saved
        if self.before_save is not None:
            self.before_save()
        meta = {"step": step, "epoch": step // self.steps_per_epoch, "world": self.world,
                "engine": self.engine.name, "frozen_sha256": self.frozen_sha, "final": final,
                "identity": self.identity}
        if self.clock is not None:
            meta["wall_time_s"], meta["parts"] = self.clock()
        with self.engine.world_bn_statistics() as own:  # collective: the world's mean of the running statistics
            self.last_saved = save(self.run_dir, self.engine, self.rank, meta, self.source.state(), self.keep,
                                   self.save_frozen, own)
        return self.last_saved

    def resume(self) -> Resumed | None:
        """Load the newest good checkpoint into the engine and the data source (collective)."""
        restored = resume(self.run_dir, self.engine, self.rank, self.world, self.frozen_sha, self.identity)
        if not restored:
            return None
        path, meta, data_state = restored
        if meta["frozen_included"]:
            self.frozen_sha = meta["frozen_sha256"]  # the stored frozen weights are the run's now
        self.source.load_state(data_state)
        return Resumed(path, meta["step"], meta["world"], self.frozen_sha, meta.get("wall_time_s", 0.0),
                       meta.get("parts", 1))
