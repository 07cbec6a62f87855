"""Finding run directories and reading what a finished run left: config, summary, metrics."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bnonly_dist import config, models
from bnonly_dist.config import ConfigError
from bnonly_dist.run.finished import end_of, reached_end

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    run_dir: Path
    cfg: config.Config
    summary: dict
    last_eval: dict  # the final `kind: eval` row of metrics.jsonl

    @property
    def arch(self) -> models.Arch:
        return models.parse_arch(self.cfg.model.arch)

    @property
    def num_classes(self) -> int:
        """As the run trained it (summary.json), else from the config or its data set."""
        cfg = self.cfg
        if self.summary.get("num_classes") or cfg.model.num_classes:
            return self.summary.get("num_classes") or cfg.model.num_classes
        if cfg.data.name == "synthetic":
            return cfg.data.synthetic_classes
        if cfg.data.name == "cifar10":
            return 10
        from bnonly_dist.data.layout import imagenet_index
        return len(imagenet_index(cfg.data.root, check_val=False)[0])

    @property
    def key(self) -> tuple[str, str, str]:
        """(dataset, arch, mode); which runs are seeds of one experiment is cells.group's rule, not this."""
        return self.cfg.data.name, self.cfg.model.arch, self.cfg.mode


RUN_MARKS = ("summary.json", "metrics.jsonl", "checkpoints")  # what a run leaves besides config.yaml


def _find_runs(folder: Path, found: list[Path], visited: set[Path]) -> None:
    """Run directories (a folder holding config.yaml) at any depth under folder, e.g. runs/<sweep>/<run>;
    a run directory's own folders are not searched, nor hidden ones, nor a data set's; a folder that
    looks like a run without its config.yaml is said and skipped."""
    real = folder.resolve()
    if real in visited:  # a link back up the tree
        return
    visited.add(real)
    if (folder / "config.yaml").is_file():
        found.append(folder)
        return
    if any((folder / mark).exists() for mark in RUN_MARKS):
        log.warning("skipping %s: it holds %s but no config.yaml, so what it ran is unknown; put the config it "
                    "trained with there as config.yaml to include it", folder,
                    " and ".join(m for m in RUN_MARKS if (folder / m).exists()))
        return
    if (folder / "data_batch_1").is_file() or ((folder / "train").is_dir() and (folder / "val").is_dir()):
        return  # a data set (runs/data/ of `make demo`): thousands of image folders, no runs
    try:
        with os.scandir(folder) as entries:  # the entries' types without a stat each
            children = sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        log.warning("skipping %s: cannot list it (%s)", folder, err.strerror)
        return
    for child in children:
        _find_runs(child, found, visited)


def _run_dirs(path: Path) -> list[Path]:
    if path.is_file():  # a sweep file: its points' run directories
        from bnonly_dist.launch import sweep
        return [p.run_dir for p in sweep.load(path).points]
    if path.is_dir():  # a run directory, or a folder of runs at any depth (runs/, runs/<sweep>/)
        found: list[Path] = []
        _find_runs(path, found, set())
        return found
    raise ConfigError(f"{path} is neither a run directory, a folder of runs nor a sweep file")


def _metrics_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a torn or garbled line (a killed run, a full disk) is skipped with a warning."""
    rows = []
    if not path.is_file():
        return rows
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "kind" not in row:
            log.warning("%s: line %d is not a metrics record (torn by a kill or a full disk?); skipped", path, number)
            continue
        rows.append(row)
    return rows


def _unfinished(run_dir: Path) -> str:
    """What is true of a run directory without summary.json: its job queued or running, or gone."""
    from bnonly_dist.launch import cluster
    job = cluster.recorded_job(run_dir)
    if job and cluster.job_alive(job):
        return f"not finished; its job {job} is queued or running"
    if job:
        return (f"not finished, and its job {job} is no longer queued or running (stopped or failed: see the job's "
                "log); launch it again to resume")
    return "not finished; no Slurm job recorded for it (a local process still running, or stopped: launch it again)"


def read(run_dir: Path) -> RunRecord | None:
    """The finished run in run_dir, or None (with a log line) if it has not finished or cannot be read."""
    summary_path = run_dir / "summary.json"
    if not run_dir.is_dir():
        log.warning("skipping %s: never launched (no run directory yet)", run_dir)
        return None
    if not summary_path.is_file():
        log.warning("skipping %s: %s", run_dir, _unfinished(run_dir))
        return None
    try:
        summary = json.loads(summary_path.read_bytes().decode("utf-8"))
        if not isinstance(summary, dict) or not isinstance(summary.get("final"), dict):
            raise ValueError("not a run summary")
        summary["trainable_params"], summary["final"]["top1"], summary["final"]["top5"]  # noqa: B018 - the keys used
    except (OSError, ValueError, KeyError) as err:
        log.warning("skipping %s: %s is unreadable (%s); rerun `bnonly train` on it to rewrite it", run_dir,
                    summary_path, type(err).__name__)
        return None
    config_path = run_dir / "config.yaml"
    try:
        cfg = config.from_dict(config.read_run_config(config_path))
    except ConfigError as err:
        log.warning("skipping %s: %s is unreadable (%s)", run_dir, config_path, str(err).splitlines()[0][:200])
        return None
    if not reached_end(summary, cfg):  # the one meaning of finished, as train's "nothing to do" uses it
        log.warning("skipping %s: not finished; its summary.json is from step %s, before the end its config.yaml "
                    "asks for (%s): a later start went on from there; run it again to finish", run_dir,
                    summary.get("step"), end_of(cfg))
        return None
    evals = [r for r in _metrics_rows(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    return RunRecord(run_dir, cfg, summary, evals[-1] if evals else summary["final"])


def collect(paths: list[str | Path]) -> list[RunRecord]:
    """Every finished run under the given run directories, folders of runs or sweep files."""
    seen, records, skipped = set(), [], 0
    for path in paths:
        run_dirs = _run_dirs(Path(path))
        absent = [d for d in run_dirs if not d.exists()]
        if absent:  # one line for a sweep's points never launched, not one per point
            log.warning("skipping %d of %d points of %s: never launched (no run directory yet, e.g. %s); submit it "
                        "with launchers/sweep.py", len(absent), len(run_dirs), path, absent[0])
        for run_dir in run_dirs:
            if run_dir.resolve() in seen or not run_dir.exists():
                continue
            seen.add(run_dir.resolve())
            record = read(run_dir)
            if record:
                records.append(record)
            else:
                skipped += 1
    if skipped and records:  # with none read, the caller's one error line says so
        log.warning("%d of %d run directories skipped, each for the reason said above", skipped, len(seen))
    return records
