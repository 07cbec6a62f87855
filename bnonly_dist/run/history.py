"""A run's ledger of failures, restarts and stops (RUN/history.jsonl), and the causes it names.

Three kinds of row, one JSON object per line, read back into typed rows (read()):

    Failure  {"event": "failure", "series", "job", "attempt", "step", "exit", "kind", "cause",
              "decision": "retry" | "stop", "why", "requeue"?, "unasked"?, "slurm_run"?}
    Restart  {"event": "restart", "series", "job", "attempt", "step", "checkpoint", "steps_lost", "slurm_run"?}
    Stop     {"event": "stop", "series", "job", "step", "why", "requeue"?, "unasked"?, "slurm_run"?}

A series is one submission (a Slurm job id, kept across requeues). slurm_run is the run of
a requeued Slurm job that wrote the row (SLURM_RESTART_COUNT); requeue: the row asked Slurm
for the next run; unasked: the row records a requeue Slurm made on its own. A failure's
cause is a Kind (what the rules read) and a line (what people read). Rows written before
kinds existed are read by their exit code and cause line (_legacy_kind).

Beside the ledger: each failing process leaves a note, RUN/logs/failure.rank<r>.json (its
exit code, kind, one-line error and the step its loop had reached), from which the decider
of an attempt picks the cause; a run stopped on a signal leaves RUN/logs/stopped.json. One
table (ERRORS, kind_of; exit_code) maps an exception to its kind and exit code, for the CLI
and for the supervising task alike. Only the standard library at import: `bnonly retry` must answer fast.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from bnonly_dist.run.checkpoint_files import latest, step_of
from bnonly_dist.run.paths import RunPaths


class Kind(str, Enum):
    """What ended an attempt; the value is what the ledger stores."""
    LOST_PEER = "lost_peer"  # this rank lost the others: one died or hung, or the master was unreachable
    TIMEOUT = "timeout"  # a collective outlived dist.timeout_s
    SIGNAL = "signal"  # killed by a signal: the OOM killer, kill -9, NCCL's watchdog (SIGABRT)
    DEVICE = "device"  # a CUDA or NCCL error
    IO = "io"  # an OSError: disk full, an I/O error
    ERROR = "error"  # any other error (a failed save, a bug): a restart may cure it
    NODE_LOST = "node_lost"  # Slurm requeued the job without a word from it: a node failed or rebooted
    CONFIG = "config"  # the config, the command line, the run directory or the data set
    DIVERGED = "diverged"  # the loss became NaN or inf
    DAMAGED_DATA = "damaged_data"  # a file of the data set is corrupt
    INTERRUPTED = "interrupted"  # Ctrl-C


EXIT_RETRYABLE = 1  # every kind a restart may cure (a signal: 128+N)
# The kinds never retried: their exit code and why (docs/failures.md).
NEVER_RETRIED_KINDS = {
    Kind.CONFIG: (2, "a config, command-line, run-directory or data-set error"),
    Kind.DIVERGED: (3, "the loss diverged"),
    Kind.DAMAGED_DATA: (4, "a damaged data file"),
    Kind.INTERRUPTED: (130, "interrupted by Ctrl-C"),
}
EXIT_CONFIG, EXIT_DIVERGED, EXIT_DAMAGED_DATA, EXIT_INTERRUPTED = (code for code, _ in NEVER_RETRIED_KINDS.values())
NEVER_RETRIED = {code: why for code, why in NEVER_RETRIED_KINDS.values()}  # exit code -> why
KIND_OF_EXIT = {code: kind for kind, (code, _) in NEVER_RETRIED_KINDS.items()}


# Exception -> kind: the one table the CLI and the restart rules share. Named by where each class is defined
# (no import: some pull in torch, and the loop imports this module); the most specific class of an error wins.
ERRORS = {
    "bnonly_dist.data.layout.DamagedData": Kind.DAMAGED_DATA,
    "bnonly_dist.data.layout.DataError": Kind.CONFIG,
    "bnonly_dist.config.schema.ConfigError": Kind.CONFIG,  # and RunDirError, a ConfigError
    "bnonly_dist.run.checkpoint.CheckpointIncompatible": Kind.CONFIG,
    "bnonly_dist.run.train.Diverged": Kind.DIVERGED,
    "builtins.KeyboardInterrupt": Kind.INTERRUPTED,
    "builtins.OSError": Kind.IO,
}


def kind_of(err: BaseException) -> Kind:
    """The kind of the error a run ended with: ERRORS, else a lost peer, a device error or any other error."""
    for cls in type(err).__mro__:
        kind = ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    if "torch.distributed" in sys.modules:  # a lost peer can only be said by a process that talks to peers
        from bnonly_dist import dist
        if dist.lost_contact(err):
            return Kind.TIMEOUT if any(w in str(err).lower() for w in ("timeout", "timed out")) else Kind.LOST_PEER
    return Kind.DEVICE if any(w in str(err) for w in ("CUDA", "NCCL", "cuDNN", "cuBLAS")) else Kind.ERROR


def exit_code(kind: Kind) -> int:
    return NEVER_RETRIED_KINDS[kind][0] if kind in NEVER_RETRIED_KINDS else EXIT_RETRYABLE


def kind_of_exit(code: int | None) -> Kind:
    """The kind an exit status alone says (srun's 128+N and a negative N are signals)."""
    if code in KIND_OF_EXIT:
        return KIND_OF_EXIT[code]
    return Kind.SIGNAL if code is not None and (code < 0 or code > 128) else Kind.ERROR


def meaning(code: int) -> str:
    """What an exit code (or srun's 128+N, or a negative signal number) says."""
    if code in NEVER_RETRIED:
        return NEVER_RETRIED[code]
    number = -code if code < 0 else code - 128 if code > 128 else None
    if number is not None:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(number).name}"
    return "a failure a restart may cure"


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _slurm_run() -> int | None:
    """Which run of a requeued Slurm job this process is (None outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) if "SLURM_JOB_ID" in os.environ else None


@dataclass(frozen=True)
class Failure:
    series: str
    job: str
    attempt: int
    step: int
    exit: int | None  # None: no task was left to tell it (a node lost)
    kind: Kind
    cause: str  # the failing rank's one-line error, for people
    retry: bool
    why: str
    requeue: bool = False  # the retry is a Slurm requeue this row asks for
    slurm_run: int | None = field(default_factory=_slurm_run)
    time: str = field(default_factory=now_iso)
    event = "failure"

    @property
    def unasked(self) -> bool:
        return self.kind is Kind.NODE_LOST


@dataclass(frozen=True)
class Restart:
    series: str
    job: str
    attempt: int  # the attempt that starts
    step: int  # the step of the checkpoint it resumes from
    checkpoint: str | None
    steps_lost: int
    slurm_run: int | None = field(default_factory=_slurm_run)
    time: str = field(default_factory=now_iso)
    event = "restart"


@dataclass(frozen=True)
class Stop:
    series: str
    job: str
    step: int  # the step saved
    why: str
    requeue: bool = False  # asks Slurm for the next run (a time limit, a preemption the job saw coming)
    unasked: bool = False  # records a requeue Slurm made on its own after this stop (a preemption)
    slurm_run: int | None = field(default_factory=_slurm_run)
    time: str = field(default_factory=now_iso)
    event = "stop"


Row = Failure | Restart | Stop
_KEYS = ("time", "series", "job", "attempt", "event")  # the order rows were always written in


def to_json(row: Row) -> dict:
    out = {k: v for k, v in asdict(row).items() if v is not None or k != "slurm_run"}
    if isinstance(row, Failure):
        out.pop("retry")
        out.update(kind=row.kind.value, decision="retry" if row.retry else "stop")
        if not row.requeue:
            out.pop("requeue")
        if row.unasked:
            out["unasked"] = True
    else:
        out.update({k: True for k in ("requeue", "unasked") if out.pop(k, False)})
    out["event"] = row.event
    return {**{k: out.pop(k) for k in _KEYS if k in out}, **out}


def _legacy_kind(data: dict) -> Kind:
    """The kind of a failure row written before rows carried one: from its flags, exit code and line."""
    if data.get("unasked"):
        return Kind.NODE_LOST
    if data.get("exit") in KIND_OF_EXIT:
        return KIND_OF_EXIT[data["exit"]]
    line = str(data.get("cause", "")).split(": ", 1)[-1]  # "rank 1: killed by SIGKILL"
    if line.startswith("lost contact"):
        return Kind.LOST_PEER
    return Kind.SIGNAL if line.startswith("killed by") else kind_of_exit(data.get("exit"))


def from_json(data: dict) -> Row | None:
    """A row read back (None: not a row of a known kind, or a field of the wrong type)."""
    event = data.get("event")
    cls = {"failure": Failure, "restart": Restart, "stop": Stop}.get(event)
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in data.items() if k in names}
    values["slurm_run"] = data.get("slurm_run")
    values["series"], values["job"] = str(data.get("series", "")), str(data.get("job", ""))
    if cls is Failure:
        kind = data.get("kind")
        values.update(kind=Kind(kind) if kind in Kind._value2member_map_ else _legacy_kind(data),
                      retry=data.get("decision") == "retry", requeue=bool(data.get("requeue")),
                      exit=data.get("exit"), cause=str(data.get("cause", "")), why=str(data.get("why", "")))
    elif cls is Stop:
        values.update(requeue=bool(data.get("requeue")), unasked=bool(data.get("unasked")))
    with contextlib.suppress(TypeError):
        row = cls(**values)
        if isinstance(row.step, int) and (cls is Stop or isinstance(row.attempt, int)):
            return row
    return None


@dataclass(frozen=True)
class Ledger:
    """Every row of a run's history, oldest first."""
    rows: tuple[Row, ...] = ()

    def of(self, series: str) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if r.series == series)

    @property
    def failures(self) -> tuple[Failure, ...]:
        return tuple(r for r in self.rows if isinstance(r, Failure))

    def attempt(self, series: str) -> int:
        """The number of the series' attempt that runs now (1 for its first): one after its failed ones."""
        return 1 + sum(1 for r in self.of(series) if isinstance(r, Failure))

    def retry_pending(self, series: str) -> Failure | None:
        """The series' last row if it is a decision to retry that no attempt has taken up yet."""
        mine = self.of(series)
        return mine[-1] if mine and isinstance(mine[-1], Failure) and mine[-1].retry else None


def read(run_dir: Path) -> Ledger:
    """The ledger (a torn line, from a kill mid-write, and rows that do not parse are skipped)."""
    path = RunPaths(Path(run_dir)).history
    if not path.is_file():
        return Ledger()
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            row = from_json(data) if isinstance(data, dict) else None
            if row is not None:
                rows.append(row)
    return Ledger(tuple(rows))


def append(run_dir: Path, row: Row) -> Row:
    """Add one row; the caller holds locked() if others may write. A torn last line (a kill mid-write) is
    ended first, so that it never swallows this row."""
    path = RunPaths(Path(run_dir)).history
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(to_json(row)).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return row


@contextlib.contextmanager
def locked(run_dir: Path):
    """One decider at a time across the tasks of a job (an flock on RUN/.history.lock)."""
    path = RunPaths(Path(run_dir)).root / ".history.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Note:
    """A failing process's own word: RUN/logs/failure.rank<r>.json."""
    rank: int
    exit: int
    kind: Kind
    line: str
    step: int | None = None  # the step its loop had reached (None: it had not begun, or nobody knows)
    unix_time: float = 0.0


def note_failure(run_dir: Path, rank: int, code: int, kind: Kind, line: str, step: int | None = None) -> None:
    """This process's failure and the step its loop had reached (if known), for the attempt's decider
    (best effort: the disk may be full)."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():  # nothing is created for a run that never started
        return
    note = {"unix_time": time.time(), "rank": rank, "exit": code, "kind": kind.value,
            "line": line, **({"step": step} if isinstance(step, int) else {})}
    with contextlib.suppress(OSError):
        paths.logs.mkdir(parents=True, exist_ok=True)
        (paths.logs / f"failure.rank{rank}.json").write_text(json.dumps(note) + "\n")


def _note(data) -> Note:
    """A note read back; ValueError names what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for key, kinds in (("rank", int), ("exit", int), ("line", str), ("unix_time", (int, float))):
        if not isinstance(data.get(key), kinds) or isinstance(data.get(key), bool):
            raise ValueError(f"{key}: {data.get(key)!r}")
    step, kind = data.get("step"), data.get("kind")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise ValueError(f"step: {step!r}")
    if kind is not None and kind not in Kind._value2member_map_:
        raise ValueError(f"kind: {kind!r}")
    line = data["line"]
    kind = Kind(kind) if kind else (  # a note written before notes carried a kind
        Kind.LOST_PEER if line.startswith("lost contact") else kind_of_exit(data["exit"]))
    return Note(data["rank"], data["exit"], kind, line, step, float(data["unix_time"]))


def failures_since(run_dir: Path, since: float) -> list[Note]:
    """The failure notes written at or after since (seconds since the epoch), lowest rank first. A damaged
    note counts as no note, with one warning line."""
    notes = []
    for path in sorted(RunPaths(Path(run_dir)).logs.glob("failure.rank*.json")):
        try:
            text = path.read_text()
        except OSError:
            continue
        try:
            note = _note(json.loads(text))
        except ValueError as err:
            print(f"bnonly: warning: ignoring the damaged failure note {path} ({err})", file=sys.stderr, flush=True)
            continue
        if note.unix_time >= since:
            notes.append(note)
    return sorted(notes, key=lambda n: n.rank)


def step_reached(run_dir: Path, notes: list[Note] = ()) -> int:
    """The step an attempt reached: the furthest its failing ranks' notes name; without such notes, the last
    step the run logged (metrics.jsonl, every train.log_every steps) or saved."""
    noted = [n.step for n in notes if n.step is not None]
    if noted:
        return max(noted)
    paths = RunPaths(Path(run_dir))
    newest = latest(run_dir)
    step = step_of(newest) if newest else 0
    if paths.metrics.is_file():
        with open(paths.metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))  # the tail holds the last rows
            for line in f.read().splitlines()[::-1]:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        step = max(step, row["step"])
                        break
    return step


def note_stop(run_dir: Path, step: int, signal_name: str | None) -> None:
    """The loop stopped on a signal with a checkpoint of step: RUN/logs/stopped.json (best effort)."""
    with contextlib.suppress(OSError):
        RunPaths(Path(run_dir)).stopped.write_text(json.dumps({"unix_time": time.time(), "step": step,
                                                               "signal": signal_name}) + "\n")


def take_stop(run_dir: Path) -> int | None:
    """The step of the last stop noted and not yet taken; taken now (the next stop writes a new one)."""
    path = RunPaths(Path(run_dir)).stopped
    with contextlib.suppress(OSError, ValueError):
        note = json.loads(path.read_text())
        path.unlink()
        if isinstance(note, dict) and isinstance(note.get("step"), int):
            return note["step"]
    return None
