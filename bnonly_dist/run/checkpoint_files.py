"""A checkpoint folder on disk: its commit marker, the file list it vouches for, verification.

commit.json records, beside the run's metadata, the size and sha256 of every file the
checkpoint holds, so a truncated or altered shard is named before anything is loaded. A
marker that does not parse, lacks a key or names another step makes the checkpoint
damaged; a damaged checkpoint is moved aside to step_X.damaged (never deleted, never
counted as a kept checkpoint, never in the way of a new save of that step).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from bnonly_dist.run.paths import RunPaths

log = logging.getLogger(__name__)
COMMIT = "commit.json"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
DAMAGED_SUFFIX = ".damaged"
# key -> type every marker must carry; "files" came with verification (older markers lack it)
REQUIRED = {"step": int, "world": int, "engine": str, "frozen_sha256": str, "frozen_included": bool}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names it and the fix."""


class CheckpointDamaged(CheckpointError):
    """The files on disk are not the ones the marker committed (or the marker itself is bad)."""


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def step_dir(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}"


def committed(folder: Path) -> list[Path]:
    """step_* folders with a marker, oldest first (not verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / COMMIT).is_file()]
    return sorted(found, key=step_of)


def resume_hint(run_dir: Path) -> str:
    """The advice after an abort (bnonly train, the launchers): resume from the newest committed checkpoint, or
    start again if none was saved."""
    if not committed(RunPaths(Path(run_dir)).checkpoints):
        return f"no checkpoint was saved yet in {run_dir}; run the same command to start again"
    return "run the same command to resume from the last checkpoint"


def damaged(folder: Path) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob(f"step_*{DAMAGED_SUFFIX}*")) if folder.is_dir() else []


def _hash_and_sync(path: Path) -> str:
    """sha256 of a file; also fsyncs it, so the marker never reaches the disk before the data."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != COMMIT)


def write_marker(folder: Path, meta: dict) -> dict:
    """Write folder/commit.json: meta plus the size and sha256 of every file now in folder."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _hash_and_sync(p)}
             for p in _files(folder)}
    marker = {**meta, "files": files}
    with open(folder / COMMIT, "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return marker


def read_marker(path: Path) -> dict:
    """The marker of checkpoint path; CheckpointDamaged if it is unreadable, incomplete or names another step."""
    marker_path = Path(path) / COMMIT
    try:
        marker = json.loads(marker_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointDamaged(f"{marker_path} is unreadable ({type(err).__name__})") from None
    if not isinstance(marker, dict):
        raise CheckpointDamaged(f"{marker_path} holds {type(marker).__name__}, not the commit record")
    for key, kind in REQUIRED.items():
        if not isinstance(marker.get(key), kind) or (kind is int and isinstance(marker[key], bool)):
            raise CheckpointDamaged(f"{marker_path} lacks a valid '{key}'")
    if STEP_DIR.match(Path(path).name) and marker["step"] != step_of(path):
        raise CheckpointDamaged(f"{marker_path} is for step {marker['step']}, not {step_of(path)}")
    files = marker.get("files")
    if files is not None and (not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values())):
        raise CheckpointDamaged(f"{marker_path} has a malformed 'files' list")
    return marker


def verify(path: Path, checksums: bool = True) -> dict:
    """The marker of path once every committed file is there with its size (and sha256).

    CheckpointDamaged names the first file that is missing, truncated or altered. A marker
    written before file lists existed is accepted as it is (nothing to verify against).
    """
    path = Path(path)
    marker = read_marker(path)
    for name, entry in (marker.get("files") or {}).items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            raise CheckpointDamaged(f"{file} is missing") from None
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "longer than committed"
            raise CheckpointDamaged(f"{file} is {what} ({size} of {entry['size']} bytes)")
        if checksums and "sha256" in entry:
            try:
                digest = _hash_and_sync(file)
            except OSError as err:
                raise CheckpointDamaged(f"{file} is unreadable ({err.strerror or err})") from None
            if digest != entry["sha256"]:
                raise CheckpointDamaged(f"{file} does not match its committed checksum")
    return marker


def move_aside(path: Path, reason: str, then: str = "") -> Path:
    """Rename a damaged checkpoint to step_X.damaged (…damaged-2, … if taken) and log why."""
    path = Path(path)
    target, n = path.with_name(path.name + DAMAGED_SUFFIX), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
    os.replace(path, target)
    log.error("checkpoint %s is damaged (%s); moved aside to %s (kept for inspection, never loaded or counted)%s",
              path, reason, target.name, then)
    return target


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def newest_identity(folder: Path) -> tuple[Path, dict] | None:
    """(checkpoint, identity) from the newest marker that parses and records the run's identity."""
    for path in reversed(committed(folder)):
        try:
            identity = read_marker(path).get("identity")
        except CheckpointDamaged:
            continue
        if isinstance(identity, dict):
            return path, identity
    return None


def latest(run_dir: Path) -> Path | None:
    """The newest committed checkpoint of a run (not verified), or None."""
    found = committed(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def latest_good(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that verifies (read-only: damaged ones are skipped, not moved)."""
    for path in reversed(committed(Path(run_dir) / "checkpoints")):
        try:
            verify(path)
            return path
        except CheckpointDamaged as err:
            log.warning("skipping damaged checkpoint: %s", err)
    return None
