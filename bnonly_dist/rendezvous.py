"""Where the ranks of a run meet, from the launcher's variables; only the standard library,
so that a submitit task (launch/jobs.py) sets it without importing torch.

A process learns its place from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) or, under `srun`, from Slurm's (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID; the master is the first host of SLURM_JOB_NODELIST and the port is derived
from the job id, so a requeued job meets on the same port).
"""
from __future__ import annotations

import os
import random
import re


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login1") as host names, in order."""
    hosts = []
    for prefix, ranges, single in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if single:
            hosts.append(single)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def master_port(job_id: str) -> int:
    """A port that is a pure function of the job id (stable across requeues), below Linux's
    ephemeral range (32768+) so that no outgoing connection on the node holds it."""
    return random.Random(int(re.sub(r"\D", "", job_id) or 0)).randint(20_000, 32_767)


def environment(env=os.environ) -> dict[str, str]:
    """torchrun-style variables for this process, filled in from Slurm's when run by srun."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k in env}
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = env.get("SLURM_JOB_ID", "0")
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "MASTER_ADDR": env.get("MASTER_ADDR") or expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
                "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(job_id))}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def ranks_on_this_host(env=os.environ) -> int:
    """torchrun's LOCAL_WORLD_SIZE, else Slurm's tasks on this node (first number of
    SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE, e.g. "8(x4)"), else 1."""
    if env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"])
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        found = re.match(r"\d+", env.get(key, ""))
        if found:
            return max(1, int(found.group()))
    return 1
