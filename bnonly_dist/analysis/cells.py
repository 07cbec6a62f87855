"""The one grouping rule of the analysis: which runs are seeds of one experiment.

Runs whose identity (config.Config.identity(): every key that determines what a run
computes, and the train.max_steps a finished run ended at) differs in nothing but the seed
form a cell; the table, the figures and the
claims all read cells from here. Two runs of one cell with the same seed are one run twice
(a copied run directory, a rerun): counted once, and said. Cells of the same data set, net
and mode that differ in anything else (epochs, learning rate, ...) stay apart, each
labelled with the keys that set it apart (its setting).
"""
from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bnonly_dist.analysis.runs import RunRecord

log = logging.getLogger(__name__)

SEED = "seed"
NET_AND_MODE = ("model.arch", "mode")  # what the claims compare; everything else is the setting


def _frozen(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True, default=str)


def identity_of(record: RunRecord) -> dict:
    """What the run computed: its config's identity and the train.max_steps it ended at (not part of the
    identity, since a run may be resumed past it, but a run finished there is a shorter experiment)."""
    return {**record.cfg.identity(), "train.max_steps": record.cfg.train.max_steps}


def setting_of(record: RunRecord) -> dict:
    """The identity without seed, net and mode: runs compared with each other must share it."""
    return {k: v for k, v in identity_of(record).items() if k != SEED and k not in NET_AND_MODE}


@dataclass
class Cell:
    records: list[RunRecord]  # one per seed, in seed order
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (counted once as, also found at)
    setting: str = ""  # the keys that set this cell's setting apart from the others ("" when there is one)
    setting_key: str = ""  # the setting itself, frozen (equal for cells that may be compared)

    @property
    def dataset(self) -> str:
        return self.records[0].cfg.data.name

    @property
    def arch(self) -> str:
        return self.records[0].cfg.model.arch

    @property
    def mode(self) -> str:
        return self.records[0].cfg.mode

    @property
    def seeds(self) -> list[int]:
        return [r.cfg.seed for r in self.records]

    @property
    def trainable(self) -> set[int]:
        return {r.summary["trainable_params"] for r in self.records}

    def top1(self) -> list[float]:
        return [r.summary["final"]["top1"] for r in self.records]


def mean_std(values: list[float | None]) -> tuple[float, float | None, int] | None:
    """(mean, standard deviation, n) of the values given; the deviation is None for one value (no spread)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def _label(setting: dict, others: list[dict]) -> str:
    """`key=value, ...` for the keys whose value is not the same in every setting."""
    keys = {k for other in others for k in other}
    varying = sorted(k for k in keys if len({json.dumps(o.get(k), default=str) for o in others}) > 1)
    return ", ".join(f"{k}={json.dumps(setting.get(k), default=str)}" for k in varying)


def group(records: list[RunRecord]) -> list[Cell]:
    """Cells of runs equal in everything but the seed; duplicate seeds counted once (warned)."""
    by_identity: dict[str, dict[int, RunRecord]] = defaultdict(dict)
    duplicates: dict[str, list[tuple[Path, Path]]] = defaultdict(list)
    for record in sorted(records, key=lambda r: str(r.run_dir)):
        identity = {k: v for k, v in identity_of(record).items() if k != SEED}
        key, seed = _frozen(identity), record.cfg.seed
        kept = by_identity[key].get(seed)
        if kept is not None:
            same = kept.summary.get("fingerprint") == record.summary.get("fingerprint")
            log.warning("%s and %s are the same run (seed %d, every other key equal%s): counted once", kept.run_dir,
                        record.run_dir, seed, "" if same else "; their final models differ")
            duplicates[key].append((kept.run_dir, record.run_dir))
            continue
        by_identity[key][seed] = record
    settings = {key: setting_of(next(iter(seeds.values()))) for key, seeds in by_identity.items()}
    distinct = list({_frozen(s): s for s in settings.values()}.values())
    cells = []
    for key, seeds in by_identity.items():
        setting = settings[key]
        cells.append(Cell([seeds[s] for s in sorted(seeds)], duplicates[key],
                          _label(setting, distinct) if len(distinct) > 1 else "", _frozen(setting)))
    return cells
