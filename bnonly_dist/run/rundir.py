"""A run directory: claim it for one start, create it, save the config.

A start checks the directory once, under its lock (an exclusive flock on RUN/.lock: one
trainer per run directory; the OS drops it when the process dies, so a killed run leaves
no stale lock). claim() refuses a directory that cannot hold this run and creates nothing
new; create() makes the directory and writes config.yaml atomically (rank 0 only).
check() is the read-only preview of the same refusals, for dry runs.

The run's identity is read from config.yaml, or, when that is missing or unreadable while
checkpoints exist, from the newest checkpoint's marker: a run that computes something
else is refused either way. Likewise what its data set is (data.json, else the marker's
"data.contents"): the same data at another data.root resumes, other data is refused.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from bnonly_dist.config import Config, ConfigError, from_dict, read_run_config, save
from bnonly_dist.data.identity import difference
from bnonly_dist.run.checkpoint_files import newest_identity
from bnonly_dist.run.paths import RunPaths


class RunDirError(ConfigError):
    """The run directory cannot hold this run (a file in the way, no write permission, in use)."""


class RunDirInUse(RunDirError):
    """Another live trainer holds the run directory's lock."""


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _check_paths(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RunDirError(f"run dir {root} is a file, not a directory; pass another --run-dir")
    if not root.exists():
        parent = root.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise RunDirError(f"cannot create run dir {root}: {parent} is a file; pass another --run-dir "
                              "(or fix runs_root)")
        if not _writable(parent):
            raise RunDirError(f"cannot create run dir {root}: {parent} is not writable; pass another --run-dir "
                              "(or fix runs_root, or the permissions)")
        return
    if not _writable(root):
        raise RunDirError(f"run dir {root} is not writable; fix its permissions or pass another --run-dir")
    paths = RunPaths(root)
    for folder in (paths.checkpoints, paths.logs, paths.tb):
        if folder.exists() and not folder.is_dir():
            raise RunDirError(f"{folder} is a file where the run keeps a folder; move it away and run again")
        if folder.is_dir() and not _writable(folder):
            raise RunDirError(f"{folder} is read-only; fix its permissions (or move the run dir) and run again")
    for file in (paths.config, paths.metrics, paths.summary):
        if file.is_dir():
            raise RunDirError(f"{file} is a folder where the run keeps a file; move it away and run again")


def _saved_identity(paths: RunPaths) -> tuple[dict, str] | None:
    """(identity, where it came from) of the run already in the directory, or None if it holds none."""
    problem = None
    if paths.config.is_file():
        try:
            return from_dict(read_run_config(paths.config)).identity(), str(paths.config)
        except ConfigError as err:
            problem = str(err).splitlines()[0]
    stored = newest_identity(paths.checkpoints)
    if stored:
        return stored[1], f"{stored[0]}/commit.json"
    if problem:
        raise RunDirError(f"{paths.config} is unreadable ({problem}) and no checkpoint records the run; "
                          "restore it, or delete it to start this run dir afresh, or pass another --run-dir")
    return None


# Named first when a run directory refuses a config: what a reader recognises a run by.
_FIRST_KEYS = ("model.arch", "mode", "seed", "data.name")


def _importance(key: str) -> tuple:
    """Sort key of a differing config key: arch, mode, seed, the data keys, then the rest by name."""
    rank = _FIRST_KEYS.index(key) if key in _FIRST_KEYS else len(_FIRST_KEYS) + (0 if key.startswith("data.") else 1)
    return rank, key


def shown(value) -> str:
    """A config value as a user writes it in YAML or an override (null, true, [80, 120])."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def differences(old: dict, new: dict, keys) -> str:
    """Every key of keys whose value differs, most important first: "k=old, not new; ..." ('' if none)."""
    changed = sorted((k for k in keys if old.get(k) != new.get(k)), key=_importance)
    return "; ".join(f"{k}={shown(old.get(k))}, not {shown(new.get(k))}" for k in changed)


def _check_identity(cfg: Config, root: Path) -> None:
    saved = _saved_identity(RunPaths(root)) if root.is_dir() else None
    if saved is None:
        return
    old, source = saved
    new = cfg.identity()
    keys = old.keys() | new.keys() if source.endswith("config.yaml") else old.keys() & new.keys()
    differs = differences(old, new, keys)
    if differs:
        fix = "name=NEW_NAME (or --run-dir DIR)" if cfg.name else "--run-dir DIR (or name=NEW_NAME)"
        raise ConfigError(f"{root} holds a run with {differs} (from {source}); to train this config elsewhere pass "
                          f"{fix}, or pass the original settings to resume that run")


DATA_KEY = "data.contents"  # the identity key under which checkpoints carry the data set's record


def _saved_data(paths: RunPaths) -> tuple[dict, str] | None:
    """(record of the data set, where it came from) the run in the directory trained on, or None."""
    try:
        record = json.loads(paths.data.read_text())
        if isinstance(record, dict):
            return record, str(paths.data)
    except (OSError, ValueError):
        pass  # missing or damaged: the checkpoints say it too
    stored = newest_identity(paths.checkpoints)
    if stored and isinstance(stored[1].get(DATA_KEY), dict):
        return stored[1][DATA_KEY], f"{stored[0]}/commit.json"
    return None


def data_difference(root: Path, record: dict | None) -> tuple[str, str] | None:
    """(what differs, where the run's record came from) if the run in root trained on another data set than
    record describes; None if the same, or if either side has no record (synthetic data)."""
    saved = _saved_data(RunPaths(root)) if record is not None else None
    if saved is None:
        return None
    differs = difference(saved[0], record)
    return (differs, saved[1]) if differs else None


def _check_data(cfg: Config, root: Path, record: dict | None) -> None:
    """ConfigError if the run in root trained on another data set than record describes."""
    found = data_difference(root, record)
    if found:
        raise ConfigError(f"{root} holds a run trained on other data than data.root={cfg.data.root}: {found[0]} (from "
                          f"{found[1]}); point data.root at the data set it trained on, or pass a new --run-dir")


def check(cfg: Config, run_dir: Path) -> None:
    """ConfigError if run_dir cannot hold this run; reads only (a dry run's preview of claim())."""
    root = Path(run_dir)
    _check_paths(root)
    _check_identity(cfg, root)


class RunLock:
    """The exclusive lock on a run directory; release() (or process exit) gives it up."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: Path) -> RunLock:
    """Take run_dir's lock (it must exist); RunDirInUse naming the holder if a live trainer has it."""
    root = Path(run_dir)
    path = RunPaths(root).lock
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    except OSError as err:
        raise RunDirError(f"cannot create the lock file {path} ({err.strerror}); fix the permissions of {root} "
                          "or pass another --run-dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "holder unknown"
        raise RunDirInUse(f"run dir {root} is in use by another trainer ({who}); wait for it or pass another "
                          "--run-dir") from None
    except OSError as err:  # a file system without flock support
        os.close(fd)
        raise RunDirError(f"cannot lock {path} ({err.strerror}); put the run dir on a file system that supports "
                          "flock (e.g. Lustre mounted with -o flock)") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as err:  # e.g. a full disk: give the lock back instead of leaking it
        os.close(fd)
        raise RunDirError(f"cannot write the lock file {path} ({err.strerror}); free space in {root} or pass "
                          "another --run-dir") from None
    return RunLock(path, fd)


def claim(cfg: Config, run_dir: Path) -> RunLock | None:
    """The one check of a start: ConfigError if run_dir cannot hold this run; creates nothing new.

    Where run_dir exists, its lock is taken before its identity is read: a trainer writes
    config.yaml only while it holds the lock, so what was read cannot change before this
    start writes its own (race-free). Where it does not exist there is nothing to read yet
    and None is returned: create() checks once it has made and locked the directory.
    """
    root = Path(run_dir)
    _check_paths(root)
    if not root.is_dir():
        return None
    lock_existed = RunPaths(root).lock.exists()
    lock = acquire(root)
    try:
        _check_identity(cfg, root)
    except BaseException:
        if not lock_existed:  # a refused directory is left as it was found
            lock.path.unlink(missing_ok=True)
        lock.release()
        raise
    return lock


def _write(path: Path, write) -> None:
    """write(tmp) then rename onto path: never a half-written file for a later resume to trip on."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"cannot write {path} ({err.strerror}); free space or fix permissions and run again") from None


def create(cfg: Config, run_dir: Path, lock: RunLock | None, data: dict | None = None) -> RunLock:
    """Make run_dir (claimed by claim(), which returned lock), hold its lock, (re)write config.yaml and,
    given the record of the data set (data.identity_of), check it against the run's and write data.json."""
    paths = RunPaths(Path(run_dir))
    if lock is None:
        try:
            paths.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"cannot create run dir {paths.root} ({err.strerror}); pass another --run-dir") from None
        lock = acquire(paths.root)
        try:  # another process may have made it since claim(): its identity is read under the lock, once
            _check_identity(cfg, paths.root)
        except BaseException:
            lock.release()
            raise
    try:
        _check_data(cfg, paths.root, data)
        _write(paths.config, lambda tmp: save(cfg, tmp))
        if data is not None:
            _write(paths.data, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))
    except BaseException:
        lock.release()
        raise
    return lock


def prepare_all(runs: list[tuple[Config, Path]]) -> None:
    """Launchers: claim every (config, run dir) before creating any, so that a refused one leaves
    nothing behind; then create them and let the locks go (each job's trainer takes its own)."""
    locks: list[RunLock | None] = []
    try:
        for cfg, run_dir in runs:
            locks.append(claim(cfg, run_dir))
        for i, (cfg, run_dir) in enumerate(runs):
            locks[i] = create(cfg, run_dir, locks[i])
    finally:
        for lock in locks:
            if lock is not None:
                lock.release()


def prepare(cfg: Config, run_dir: Path) -> None:
    """prepare_all for one run."""
    prepare_all([(cfg, run_dir)])
