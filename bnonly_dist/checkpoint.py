"""Sharded checkpoints with torch.distributed.checkpoint (DCP), atomic and self-verifying.

Layout: RUN/checkpoints/step_00001000/ (DCP shards + .metadata). A save goes to
.tmp-step_.../ and is renamed once every rank has written and DCP has written
.metadata last, so a directory named step_* is always complete; resume takes the newest
one holding .metadata. Frozen weights are not saved: they are regenerated from the seed
and checked against the sha256 stored with the checkpoint.
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

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from bnonly_dist import dist

log = logging.getLogger(__name__)
# A single-process run saves without a process group, as intended: DCP's warning is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names it and the fix."""


class FrozenWeightsMismatch(CheckpointError):
    """The regenerated frozen weights are not the ones the checkpoint was trained with."""


def tensor_digest(named_tensors) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the whole model state (parameters and buffers): equal iff bit-identical."""
    return tensor_digest(model.state_dict().items())


def frozen_digest(model: torch.nn.Module) -> str:
    return tensor_digest((n, p) for n, p in model.named_parameters() if not p.requires_grad)


def _frozen_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def complete_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _state(model, optimizer, rank: int, progress: dict, data_state: dict, frozen_sha: str) -> dict:
    frozen = _frozen_names(model)
    model_state = {k: v for k, v in get_model_state_dict(model).items() if k not in frozen}
    state = {"model": model_state, "meta": {"progress": json.dumps(progress), "frozen_sha256": frozen_sha},
             f"rank{rank}": {"rng_cpu": torch.get_rng_state(), "data": json.dumps(data_state)}}
    if torch.cuda.is_available():
        state[f"rank{rank}"]["rng_cuda"] = torch.cuda.get_rng_state()
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save(run_dir: Path, step: int, model, optimizer, rank: int, progress: dict, data_state: dict,
         frozen_sha: str, keep: int) -> Path:
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step:08d}"
    if (final / ".metadata").is_file():
        return final  # already saved at this step (e.g. epoch end and periodic save coincide)
    tmp = folder / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(_state(model, optimizer, rank, progress, data_state, frozen_sha), checkpoint_id=tmp)
    except OSError as err:
        raise CheckpointError(f"saving checkpoint {final} failed ({err.strerror or err}); free disk space "
                              f"in {folder} and start again: it resumes from {latest(run_dir) or 'scratch'}") from None
    dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, optimizer, rank: int, frozen_sha: str) -> tuple[dict, dict]:
    """Restore model/optimizer/RNG in place; return (progress, this rank's data state)."""
    state = _state(model, optimizer, rank, {}, {}, "")
    try:
        dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    except (Exception, dcp.api.CheckpointException) as err:  # noqa: BLE001 - damaged files raise many types
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); move it aside to resume "
                              "from the one before") from None
    if state["meta"]["frozen_sha256"] != frozen_sha:
        raise FrozenWeightsMismatch(f"{path}: the frozen weights regenerated from the seed differ from the ones this "
                              "checkpoint was trained with (changed seed, model code or torch version?); "
                              "resume with the original setup or start a new run directory")
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    mine = state.get(f"rank{rank}", {})
    # A rank the checkpoint did not have (larger world) keeps its placeholders: its own RNG.
    torch.set_rng_state(mine["rng_cpu"])
    if "rng_cuda" in mine:
        torch.cuda.set_rng_state(mine["rng_cuda"])
    return json.loads(state["meta"]["progress"]), json.loads(mine["data"])


def resume(run_dir: Path, model, optimizer, rank: int, frozen_sha: str):
    """Load the newest readable complete checkpoint: (path, progress, data state), or None.

    An unreadable one (damaged after it was committed) is skipped with a warning and left
    on disk; a frozen-weight mismatch is an error, since older ones would share it.
    """
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            progress, data_state = load(path, model, optimizer, rank, frozen_sha)
        except FrozenWeightsMismatch:
            raise
        except CheckpointError as err:
            log.error("%s; trying the one before", err)
            continue
        return path, progress, data_state
    return None
