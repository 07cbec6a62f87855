"""Every file of a run directory, named in one place.

    RUN/config.yaml      the resolved config (written first, atomically)
    RUN/data.json        what the data set is: name, classes, image counts, digest (data/identity.py)
    RUN/metrics.jsonl    one JSON object per logged step and per evaluation
    RUN/eval.jsonl       evaluations asked for with `bnonly eval` (never mixed into metrics.jsonl)
    RUN/summary.json     final metrics and the fingerprint of the final model
    RUN/tb/              TensorBoard events
    RUN/logs/            each rank's text log; failure.rank<r>.json and stopped.json for restarts
    RUN/checkpoints/     step_XXXXXXXX/ folders (see checkpoint.py)
    RUN/history.jsonl    failures and restarts: one row per decision (see history.py)
    RUN/slurm/           submitit's folder of a launched run (scripts, task logs), and job_id
    RUN/.lock            held by the trainer that owns the run directory
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval_metrics(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def stopped(self) -> Path:
        """The last stop on a signal with a checkpoint, until the next run's requeue accounting reads it."""
        return self.logs / "stopped.json"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def job_id(self) -> Path:
        """The id of the last job a launcher submitted for this run."""
        return self.slurm / "job_id"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def run_dir(cfg, override: str | Path | None = None) -> Path:
    """The run directory of a config: --run-dir if given, else runs_root/<name derived from the config>."""
    return Path(override) if override else Path(cfg.runs_root) / cfg.run_name()


def tensorboard_command(*run_dirs: str | Path) -> str:
    """A TensorBoard command showing each run as "<run dir name>/tb", as `--logdir runs/` names it too.
    TensorBoard names a run NAME/<events folder relative to PATH>: a spec pointing at RUN/tb itself
    would show "NAME/.", so each entry points at the run directory."""
    spec = ",".join(f"{Path(d).name}:{Path(d)}" for d in run_dirs)
    return f"tensorboard --logdir_spec {shlex.quote(spec)}"
