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
from bnonly_dist.launch.cluster import DEFAULT_CPUS_PER_TASK, Target, tasks_per_node


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
    from bnonly_dist.models import memory
    from bnonly_dist.run import rundir
    refusals = Refusals()
    refusals.check(plan.per_rank, cfg.data.batch_size, target.world)
    device = refusals.check(job_device, cfg, target)
    resolved = None
    if device:  # the world's rules (BN groups) and the device's; builds nothing real
        resolved = refusals.check(plan.resolve, cfg, torch.device(device), target.world, memory)
    if preview_run_dir:
        refusals.check(rundir.check, cfg, run_dir)
    refusals.raise_any()
    bn = f"{resolved.bn.describe(resolved.per_rank_batch)} ({target.world} rank{'s' if target.world > 1 else ''})"
    return bn if cfg.data.name != "imagenet" else f"{bn}\n{dali_line(cfg, target)}"


def dali_line(cfg: Config, target: Target) -> str:
    """DALI's threads per rank and the task's CPUs they come from (data.threads: the one rule)."""
    from bnonly_dist.data.threads import dali_threads, task_cpus
    env = ({"SLURM_CPUS_PER_TASK": str(target.cpus_per_task)} if target.slurm
           else {"LOCAL_WORLD_SIZE": str(target.world)})
    cpus = task_cpus(env)
    why = ("data.num_threads" if cfg.data.num_threads != "auto"
           else "the task's CPUs minus one, which the training loop keeps")
    where = "per task" if target.slurm else f"per rank (this machine's cores shared by {target.world})"
    threads = dali_threads(cfg.data.num_threads, env)
    return f"DALI: {threads} CPU thread{'s' if threads > 1 else ''} per rank ({why}); {cpus} CPUs {where}"


# A CPU fallback asks first only when what backward keeps, over all its processes, passes this share of the
# machine's memory: the rest holds the model, optimizer, data and everything else running (README's small
# ImageNet trial keeps a few GiB and goes ahead; an ImageNet config's real batch does not).
LOCAL_COST_SHARE = 0.5


def local_cost(cfg: Config, target: Target, local: bool, ask=None) -> str | None:
    """An ImageNet network falling back to this machine's CPU (no Slurm here) holds GiB and takes long per step: its
    memory estimate (the plan's), stated before anything starts. With --local, or where it keeps at most
    LOCAL_COST_SHARE of this machine's memory, that is the line to print; else ask(question) -> bool where a
    person can answer, and ConfigError if not agreed (or nobody can)."""
    from bnonly_dist.config.catalog import num_classes, parse_arch
    if target.slurm or parse_arch(cfg.model.arch).family != "imagenet" or job_device(cfg, target) != "cpu":
        return None
    import torch

    from bnonly_dist.config import plan as plans
    from bnonly_dist.models import memory
    cpu = torch.device("cpu")
    plan = plans.resolve(cfg, cpu, target.world, memory)
    batch = max(1, cfg.data.batch_size // target.world)
    kept = memory.plain_saved_bytes(cfg.model.arch, num_classes(cfg), cfg.mode, batch, cfg.data.image_size,
                                    plan.channels_last, plan.checkpointed_stages, plan.bf16)
    here = memory.rank_memory_bytes(cpu)
    lean = "; the lean path keeps about half" if plan.lean else ""
    cost = (f"{cfg.model.arch} on this machine's CPU: {target.world} process(es) of {batch} images per step, whose "
            f"backward keeps about {kept / 2**30:.1f} GiB each with plain autograd{lean} (this machine has "
            f"{here / 2**30:.0f} GiB of memory)")
    if local or target.world * kept <= LOCAL_COST_SHARE * here:
        return f"{'--local: ' if local else ''}{cost}"
    if ask is not None and ask(f"no Slurm here: {cost}; start it here anyway? [y/N] "):
        return cost
    why = "not confirmed" if ask is not None else "not started without a terminal to confirm it"
    raise ConfigError(f"no Slurm here: {cost}, more than {LOCAL_COST_SHARE:.0%} of it: {why}; pass --local to run it "
                      "here anyway, or submit where Slurm is (a small trial: README, Trying an ImageNet config)")


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


def _unmet(name: str, part: Partition, res: dict) -> list[str]:
    """Every way partition name cannot run the request (nodes, GPUs and CPUs per node), or []. With
    --gpus-per-node unset (refused on its own) the nodes and one task's CPUs are still checked."""
    nodes, gpus = res["nodes"], res.get("gpus_per_node")
    tasks = tasks_per_node(res) if gpus is not None else 1
    cpus = tasks * res["cpus_per_task"]
    total = sum(g.count for g in part.groups)
    unmet = []
    if part.max_nodes is not None and nodes > part.max_nodes:
        unmet.append(f"--nodes {nodes} but partition {name} allows at most {part.max_nodes} nodes per job")
    elif nodes > total:
        unmet.append(f"--nodes {nodes} but partition {name} has {total} node(s); ask for at most {total}")
    wanted = min(nodes, total)  # the node count is refused above: check the rest as if it fitted
    with_gpus = sum(g.count for g in part.groups if g.gpus >= (gpus or 0))
    if with_gpus < wanted:
        most = max(g.gpus for g in part.groups)
        unmet.append(f"--gpus-per-node {gpus} but {'no' if not with_gpus else f'only {with_gpus} of the'} nodes of "
                     f"partition {name} have {gpus} GPU{'s' if gpus > 1 else ''} (most: {most}); ask for at most "
                     f"{most} per node" + (", or --gpus-per-node 0 for a CPU job" if not most else ""))
    # CPUs on the nodes with the GPUs asked for (on every node where none has them: that is refused above)
    candidates = [g for g in part.groups if g.gpus >= (gpus or 0)] or part.groups
    fitting = sum(g.count for g in candidates if g.cpus >= cpus)
    if fitting < wanted:
        most = max(g.cpus for g in candidates)
        unmet.append(f"{tasks} task(s) x --cpus-per-task {res['cpus_per_task']} = {cpus} CPUs per node, but "
                     f"{'no' if not fitting else f'only {fitting} of the'} nodes of partition {name} have that many "
                     f"(most: {most}); lower --cpus-per-task")
    return unmet


# --cpus-per-task by default: the partition's CPUs per task (per GPU on GPU nodes), at most this many. DALI's
# ImageNet pipeline decodes on the GPU (nvJPEG); its CPU threads read files and run the host part of the decode,
# and NVIDIA's ResNet-50 reference feeds one A100 (about 2,500 img/s) from well under 16 cores. More would only
# hold cores other jobs on a shared node could use; ask for them with --cpus-per-task.
CPUS_PER_TASK_CAP = 16


def read_partitions(run=subprocess.run) -> tuple[dict[str, Partition] | None, str | None]:
    """sinfo's partitions, or None and the line that says the request is not checked against the cluster."""
    try:
        out = run(SINFO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"sinfo did not answer ({type(err).__name__}): the request is not checked against the cluster"
    if out.returncode != 0:
        return None, f"sinfo failed ({out.stderr.strip()[:200]}): the request is not checked against the cluster"
    return parse_sinfo(out.stdout) or None, None


def _asked(res: dict, parts: dict[str, Partition]) -> list[str]:
    """The partitions a request names, else the cluster's default ([] if it has none)."""
    named = [p.strip() for p in str(res.get("partition") or "").split(",") if p.strip()]
    return named or [name for name, part in parts.items() if part.default]


def settle_cpus_per_task(res: dict, parts: dict[str, Partition] | None) -> str | None:
    """Set res["cpus_per_task"] where neither flag nor file did: the first partition asked for, its nodes' CPUs
    shared by the tasks of a node (on the nodes with the GPUs asked for, the fewest CPUs), capped at
    CPUS_PER_TASK_CAP. The line that says so, or None where the request set it."""
    if res.get("cpus_per_task") is not None:
        return None
    name = next((n for n in _asked(res, parts) if n in parts), None) if parts else None
    groups = [g for g in parts[name].groups if g.gpus >= (res.get("gpus_per_node") or 0)] if name else []
    if not groups:
        res["cpus_per_task"] = DEFAULT_CPUS_PER_TASK
        return f"--cpus-per-task {DEFAULT_CPUS_PER_TASK} (sinfo names no partition to take it from)" if parts else None
    tasks = tasks_per_node(res)
    node_cpus = min(g.cpus for g in groups)
    res["cpus_per_task"] = max(1, min(CPUS_PER_TASK_CAP, node_cpus // tasks))
    per = "GPU" if res.get("gpus_per_node") else "task"
    capped = f", capped at {CPUS_PER_TASK_CAP}" if node_cpus // tasks > CPUS_PER_TASK_CAP else ""
    return (f"--cpus-per-task {res['cpus_per_task']}: partition {name}'s nodes have {node_cpus} CPUs for "
            f"{tasks} {per}{'s' if tasks > 1 else ''}{capped} (--cpus-per-task N to choose)")


def check_capacity(res: dict, parts: dict[str, Partition] | None) -> None:
    """ConfigError naming every mismatch if no partition asked for can ever run the job (it would pend forever)."""
    if not parts:
        return
    asked = _asked(res, parts)  # none: sbatch itself says the partition is missing
    reasons = [[f"partition {name!r} does not exist here; sinfo lists {', '.join(sorted(parts))}"] if name not in parts
               else _unmet(name, parts[name], res) for name in asked]
    if asked and all(reasons):  # every partition named fails; Slurm would take the first that fits
        raise ConfigError("\n".join(reasons[0]))


def check_cluster(res: dict, run=subprocess.run) -> str | None:
    """Where Slurm runs the job: --cpus-per-task settled (settle_cpus_per_task) and the request checked against
    sinfo's partitions (check_capacity). The lines to print, or None."""
    parts, unread = read_partitions(run)
    cpus = settle_cpus_per_task(res, parts)
    check_capacity(res, parts)
    return "\n".join(x for x in (unread, cpus) if x) or None
