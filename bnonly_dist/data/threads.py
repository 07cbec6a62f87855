"""data.num_threads=auto: DALI's CPU threads for one rank, from the CPUs its task really has.

Under Slurm a task has SLURM_CPUS_PER_TASK CPUs (the launcher's --cpus-per-task, by default
the partition's CPUs per GPU); elsewhere the ranks of a node share the cores this process may
run on (its CPU affinity), one share per local rank (torchrun's LOCAL_WORLD_SIZE, Slurm's
SLURM_NTASKS_PER_NODE). DALI gets the task's CPUs minus one, which the training loop keeps
(it launches the GPU's work and runs the collectives): more threads than that only make DALI
and the loop take turns.
"""
from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_ranks(env) -> int:
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key, "").split("(")[0].split(",")[0]  # Slurm may write "4(x2)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def dali_threads(setting: int | str, env=os.environ, cores: int | None = None) -> int:
    """The thread count a setting of data.num_threads means for this process."""
    if setting != "auto":
        return int(setting)
    return max(1, task_cpus(env, cores) - 1)  # one CPU for the training loop


def task_cpus(env=os.environ, cores: int | None = None) -> int:
    """The CPUs one rank's task has: Slurm's count, else this process's cores shared by the node's ranks."""
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return int(per_task)
    return max(1, (cores or usable_cores()) // local_ranks(env))
