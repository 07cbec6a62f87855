"""Sweeps: a grid of overrides over a base config, one run directory per point.

    config: ../cifar10_resnet110.yaml      # base config, relative to the sweep file
    grid:                                  # every combination is one run
      model.arch: [cifar_resnet_14, cifar_resnet_32]
      mode: [all, bn]
      seed: [0, 1, 2]
    overrides: {optim.epochs: 160}         # optional, applied to every point
    slurm: {gpus_per_node: 1, time: "12:00:00"}   # optional resources (flags win)

`grid:` may also be a list of such mappings: the union of their points (a grid that is not
one product, e.g. every mode on one net and four modes on two others).

A point's run directory is derived from its hyperparameters, so the same sweep always
maps to the same directories: that is what makes resubmission idempotent.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from bnonly_dist import config
from bnonly_dist.config import ConfigError
from bnonly_dist.run.finished import reached_end
from bnonly_dist.run.paths import RunPaths, run_dir


@dataclass(frozen=True)
class Point:
    overrides: tuple[str, ...]
    cfg: config.Config
    run_dir: Path

    def finished(self) -> bool:
        """summary.json says the run reached the last step this point's config asks for (run/finished.py)."""
        summary = RunPaths(self.run_dir).summary
        return summary.is_file() and reached_end(json.loads(summary.read_text()), self.cfg)


@dataclass(frozen=True)
class Sweep:
    points: list[Point]
    slurm: dict
    name: str
    config: Path  # the base config file
    common: list[str]  # overrides of every point


def _override(key: str, value) -> str:
    """key=value with the value written as YAML, as the config loader reads it back."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load(path: str | Path, extra_overrides: list[str] = ()) -> Sweep:
    path = Path(path)
    spec = config.read_mapping(path, f"sweep file {path} does not exist; see configs/sweeps/")
    unknown = sorted(set(spec) - {"config", "grid", "overrides", "slurm"})
    grids = spec.get("grid") if isinstance(spec.get("grid"), list) else [spec.get("grid")]
    if (unknown or "config" not in spec or not grids or not all(isinstance(g, dict) and g for g in grids)
            or not isinstance(spec.get("overrides", {}), dict)):
        raise ConfigError(f"{path}: a sweep has `config:` (a file), `grid:` (key: [values], or a list of those) and "
                          f"optionally `overrides:` (key: value) and `slurm:`"
                          f"{'; unknown key ' + repr(unknown[0]) if unknown else ''}")
    base = path.parent / spec["config"]
    for grid in grids:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid.{key} must be a non-empty list of values")
    common = [_override(k, v) for k, v in (spec.get("overrides") or {}).items()] + list(extra_overrides)
    points = []
    for grid in grids:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            point = tuple(_override(k, v) for k, v in zip(keys, values))
            cfg = config.load(base, [*common, *point])
            points.append(Point(point, cfg, run_dir(cfg).resolve()))
    if len({p.run_dir for p in points}) != len(points):
        if len({p.cfg.model_dump_json() for p in points}) != len(points):
            raise ConfigError(f"{path}: the grids list the same point twice; make the lists of `grid:` disjoint")
        raise ConfigError(f"{path}: two grid points map to the same run directory; remove `name:` from the config")
    return Sweep(points, spec.get("slurm") or {}, path.stem, base.resolve(), common)


# A training process beside what backward keeps (the plan's estimate): torch itself, the model, the data a rank
# holds. About what one CIFAR ResNet rank holds here at its peak.
PROCESS_BASE_BYTES = 2**29


def default_parallel(points: list, world: int, gpus: int) -> tuple[int, str]:
    """Without Slurm: how many points (anything with a .cfg: Point, submission.Run) run at once here, and why. Each
    point runs world processes; as many points as this machine's cores and memory hold by the plan's estimate
    (every point on all GPUs: one at a time). launch/submission.py runs them."""
    if gpus:
        return 1, f"one point at a time here (each uses this machine's {gpus} GPU{'s' if gpus > 1 else ''})"
    import torch

    from bnonly_dist.config import plan as plans
    from bnonly_dist.config.catalog import num_classes
    from bnonly_dist.data.threads import usable_cores
    from bnonly_dist.models import memory
    cpu, estimates = torch.device("cpu"), {}
    for point in points:
        cfg = point.cfg
        plan = plans.resolve(cfg, cpu, world, memory)
        key = (cfg.model.arch, num_classes(cfg), cfg.mode, plan.per_rank_batch, cfg.data.image_size,
               plan.channels_last, plan.checkpointed_stages, plan.bf16)
        if key not in estimates:
            estimates[key] = memory.plain_saved_bytes(*key) + PROCESS_BASE_BYTES
    each, cores, here = max(estimates.values()), usable_cores(), memory.rank_memory_bytes(cpu)
    parallel = max(1, min(cores // world, here // (world * each)))
    return parallel, (f"{parallel} point{'s' if parallel > 1 else ''} at a time here: this machine's {cores} "
                      f"core{'s' if cores > 1 else ''} and {here / 2**30:.0f} GiB for {world} process(es) per point of "
                      f"about {each / 2**30:.1f} GiB each (the plan's estimate); --parallel N to choose")
