"""What a launcher checks on the submitting machine before anything is submitted or spawned.

Nothing here writes: a refused launch leaves no run directory, job folder or job behind.
The config itself was validated by config.load; this adds what needs the launch's shape:
the world size, the device the tasks will get, the data set on disk (where its path is
visible here), the run directory, and the cluster's partitions (sinfo). A launcher runs
every check it can through Refusals and reports all refusals in one go, so one try names
every fix.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bnonly_dist.config import Config, ConfigError
from bnonly_dist.data.layout import DataError
from bnonly_dist.launch.cluster import Target, tasks_per_node


# ImageNet files per split whose first bytes the launcher reads: opening all 1.28M training
# files from a login node took minutes on a network file system.
HEADER_SAMPLE = 2000


class Refused(ConfigError):
    """Every refusal of a launch, one line each (str() joins them with newlines)."""

    def __init__(self, reasons: list[str]):
        super().__init__("\n".join(reasons))
        self.reasons = reasons


class Refusals:
    """Runs the checks of a launch, keeping each refusal instead of stopping at the first."""

    def __init__(self):
        self.found: list[str] = []

    def check(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None if it refused (its one line kept, once)."""
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError) as err:
            for line in str(err).splitlines():
                if line not in self.found:
                    self.found.append(line)
            return None

    def raise_any(self) -> None:
        if self.found:
            raise Refused(self.found)


def require_data(cfg: Config) -> None:
    """data.root must be set for a data set on disk (data.require_root: the one rule)."""
    from bnonly_dist.data import require_root
    require_root(cfg)


def job_device(cfg: Config, target: Target) -> str:
    """The device type the job's tasks will train on (dist.choose_device's rule, seen from here)."""
    if cfg.train.device == "cuda" and not target.gpus_per_node:
        fix = "--gpus-per-node N" if target.slurm else "a machine with a GPU (or Slurm)"
        raise ConfigError(f"train.device=cuda but the job gets no GPU; use {fix}, or train.device=cpu")
    return "cuda" if target.gpus_per_node and cfg.train.device != "cpu" else "cpu"


def check_data(cfg: Config, slurm: bool, seen: dict | None = None) -> str | None:
    """The data set's layout (folders, file names, CIFAR headers; no image is decoded) and that the
    batch fits in it: a line saying what was found, or that the path is not visible here (slurm:
    the nodes may see what this machine does not); DataError if it is wrong. With seen, a data set
    already checked for another run gives None."""
    key = (cfg.data.name, cfg.data.root, cfg.data.batch_size)
    if seen is not None and key in seen:
        return None
    line = _check_data(cfg, slurm)
    if seen is not None:
        seen[key] = line
    return line


def _check_data(cfg: Config, slurm: bool) -> str:
    if cfg.data.name == "synthetic":
        return "data: synthetic"
    require_data(cfg)
    from bnonly_dist.data import layout, sharding
    root = Path(cfg.data.root)
    if slurm and not root.exists():
        return f"data.root={root} is not visible on this machine: not checked here (the nodes must see it)"
    report = layout.check(root, sample=HEADER_SAMPLE)
    if report["format"] != cfg.data.name:
        raise DataError(f"data.root={root} holds {report['format']} but data.name={cfg.data.name}; "
                        "fix data.root or data.name")
    sharding.steps_per_epoch(report["train_images"], cfg.data.batch_size)  # a batch larger than the set
    line = (f"data: {report['format']} at {report['root']}, {report['classes']} classes, "
            f"{report['train_images']} train / {report['val_images']} val images")
    if report["format"] == "imagenet":
        line += (f"; headers of {report['headers_checked']} files checked (a sample spread over the classes; "
                 "the run checks every validation file, `bnonly data check DIR` every file)")
    return line


def check_run(cfg: Config, run_dir: Path, target: Target, preview_run_dir: bool = False) -> str:
    """Every check of one run under target but its data (check_data), each refusal kept by refusals;
    returns the line that says how its BN statistics are grouped on this world.

    The run directory is checked here only as a dry run's preview: a launch checks it once,
    under its lock, in rundir.claim.
    """
    import torch

    from bnonly_dist.config import plan
    from bnonly_dist.run import rundir
    refusals = Refusals()
    refusals.check(plan.per_rank, cfg.data.batch_size, target.world)
    device = refusals.check(job_device, cfg, target)
    resolved = None
    if device:  # the world's rules (BN groups) and the device's; builds nothing real
        resolved = refusals.check(plan.resolve, cfg, torch.device(device), target.world)
    if preview_run_dir:
        refusals.check(rundir.check, cfg, run_dir)
    refusals.raise_any()
    return f"{resolved.bn.describe(resolved.per_rank_batch)} ({target.world} rank{'s' if target.world > 1 else ''})"


def local_cost(cfg: Config, target: Target, local: bool, ask=None) -> str | None:
    """An ImageNet network falling back to this machine's CPU (no Slurm here) would hold many GiB and take minutes
    per step: its memory estimate (the plan's), stated before anything starts. With --local that is the line to
    print; else ask(question) -> bool where a person can answer, and ConfigError if not agreed (or nobody can)."""
    from bnonly_dist.config.catalog import num_classes, parse_arch
    if target.slurm or parse_arch(cfg.model.arch).family != "imagenet" or job_device(cfg, target) != "cpu":
        return None
    import torch

    from bnonly_dist.config import plan as plans
    from bnonly_dist.models import memory
    cpu = torch.device("cpu")
    plan = plans.resolve(cfg, cpu, target.world)
    batch = max(1, cfg.data.batch_size // target.world)
    kept = memory.plain_saved_bytes(cfg.model.arch, num_classes(cfg), cfg.mode, batch, cfg.data.image_size,
                                    plan.channels_last, plan.checkpointed_stages, plan.bf16)
    here = memory.rank_memory_bytes(cpu)
    lean = "; the lean path keeps about half" if plan.lean else ""
    cost = (f"{cfg.model.arch} on this machine's CPU: {target.world} process(es) of {batch} images per step, whose "
            f"backward keeps about {kept / 2**30:.1f} GiB each with plain autograd{lean} ({here / 2**30:.0f} GiB "
            "here)")
    if local:
        return f"--local: {cost}"
    if ask is not None and ask(f"no Slurm here: {cost}; start it here anyway? [y/N] "):
        return cost
    why = "not confirmed" if ask is not None else "not started without a terminal to confirm it"
    raise ConfigError(f"no Slurm here: {cost}: {why}; pass --local to run it here anyway, or submit where Slurm is "
                      "(a small trial: README, Trying an ImageNet config)")


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of a partition that look alike to sinfo."""
    count: int
    gpus: int
    cpus: int


@dataclass
class Partition:
    groups: list[NodeGroup]
    max_nodes: int | None  # per job; None: unlimited
    default: bool


def _gpus(gres: str) -> int:
    """GPUs in a GRES string: gpu:8, gpu:a100:4(S:0-1), gpu:a:2,gpu:b:2, (null)."""
    total = 0
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = entry.strip().split(":")
        if fields[0] == "gpu":
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


def _leading_int(text: str) -> int | None:
    match = re.match(r"\d+", text)
    return int(match.group()) if match else None


SINFO = ["sinfo", "-h", "-o", "%P %D %G %c %s"]  # partition, node count, GRES, CPUs per node, nodes per job


def parse_sinfo(text: str) -> dict[str, Partition]:
    """sinfo's lines (SINFO) by partition; lines it cannot read are skipped."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 5 or _leading_int(fields[1]) is None:
            continue
        name, count, gres, cpus, size = fields
        part = parts.setdefault(name.rstrip("*"), Partition([], None, name.endswith("*")))
        part.groups.append(NodeGroup(int(count), _gpus(gres), _leading_int(cpus) or 0))
        upper = size.rpartition("-")[2]
        part.max_nodes = int(upper) if upper.isdigit() else None
    return parts


def _unmet(name: str, part: Partition, res: dict) -> str | None:
    """Why partition name cannot run the request, or None."""
    nodes, gpus = res["nodes"], res.get("gpus_per_node") or 0
    cpus = tasks_per_node(res) * res["cpus_per_task"]
    total = sum(g.count for g in part.groups)
    if part.max_nodes is not None and nodes > part.max_nodes:
        return f"--nodes {nodes} but partition {name} allows at most {part.max_nodes} nodes per job"
    if nodes > total:
        return f"--nodes {nodes} but partition {name} has {total} node(s); ask for at most {total}"
    with_gpus = sum(g.count for g in part.groups if g.gpus >= gpus)
    if with_gpus < nodes:
        most = max(g.gpus for g in part.groups)
        return (f"--gpus-per-node {gpus} but {'no' if not with_gpus else f'only {with_gpus} of the'} nodes of "
                f"partition {name} have {gpus} GPU{'s' if gpus > 1 else ''} (most: {most}); ask for at most {most} per node"
                + (", or --gpus-per-node 0 for a CPU job" if not most else ""))
    fitting = sum(g.count for g in part.groups if g.gpus >= gpus and g.cpus >= cpus)
    if fitting < nodes:
        most = max(g.cpus for g in part.groups if g.gpus >= gpus)
        return (f"{tasks_per_node(res)} task(s) x --cpus-per-task {res['cpus_per_task']} = {cpus} CPUs per node, but "
                f"{'no' if not fitting else f'only {fitting} of the'} nodes of partition {name} have that many "
                f"(most: {most}); lower --cpus-per-task")
    return None


def check_capacity(res: dict, run=subprocess.run) -> str | None:
    """ConfigError if no partition asked for can ever run the job (it would pend forever);
    a line to print where sinfo cannot answer."""
    try:
        out = run(SINFO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo did not answer ({type(err).__name__}): the request is not checked against the cluster"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()[:200]}): the request is not checked against the cluster"
    parts = parse_sinfo(out.stdout)
    if not parts:
        return None
    asked = [p.strip() for p in str(res.get("partition") or "").split(",") if p.strip()]
    if not asked:
        asked = [name for name, part in parts.items() if part.default]
        if not asked:
            return None  # no default partition: sbatch itself says what is missing
    reasons = []
    for name in asked:
        if name not in parts:
            reasons.append(f"partition {name!r} does not exist here; sinfo lists {', '.join(sorted(parts))}")
        else:
            reasons.append(_unmet(name, parts[name], res))
    if all(reasons):  # every partition named fails; Slurm would take the first that fits
        raise ConfigError(reasons[0])
    return None
