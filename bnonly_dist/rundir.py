"""A run directory: check that it may hold this run, then create it and save the config.

check() touches nothing on disk, so a refused launch leaves nothing behind; prepare()
creates the directory and writes config.yaml atomically (rank 0 only).
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from bnonly_dist.config import Config, ConfigError, from_dict, save
from bnonly_dist.paths import RunPaths


def check(cfg: Config, run_dir: Path) -> None:
    """ConfigError if run_dir holds a run that computes something else."""
    saved = RunPaths(Path(run_dir)).config
    if not saved.is_file():
        return
    old = from_dict(yaml.safe_load(saved.read_text())).identity()
    new = cfg.identity()
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        key = changed[0]
        raise ConfigError(f"{run_dir} holds a run with {key}={old.get(key)!r}, not {new.get(key)!r}; "
                          "pass a new --run-dir or the original settings")


def prepare(cfg: Config, run_dir: Path) -> None:
    """check(), then create run_dir and (re)write its config.yaml (one process)."""
    check(cfg, run_dir)
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    tmp = paths.root / ".config.yaml.tmp"
    save(cfg, tmp)
    os.replace(tmp, paths.config)  # never a half-written config.yaml for a later resume to trip on
