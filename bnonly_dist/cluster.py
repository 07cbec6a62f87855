"""Submitting runs with submitit: resources from flags over the user's cluster file.

Cluster defaults (partition, account, gpus_per_node, setup lines, ...) live in an
optional YAML file, ~/.config/bnonly/cluster.yaml or $BNONLY_CLUSTER_FILE, with the same
keys as the flags (underscores), so nobody edits code per cluster. Without `sbatch` on
the PATH the job runs on this machine with submitit's local executor.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


from bnonly_dist.config import ConfigError, read_mapping

RESOURCE_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "partition", "account", "qos", "time",
                 "mem", "constraint", "exclude", "setup", "max_requeues", "signal_delay_s")
DEFAULTS = {"nodes": 1, "cpus_per_task": 4, "time": "24:00:00", "max_requeues": 3, "signal_delay_s": 120}


def cluster_file() -> Path:
    return Path(os.environ.get("BNONLY_CLUSTER_FILE", "~/.config/bnonly/cluster.yaml")).expanduser()


def add_resource_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("resources (default: the cluster file, then built-in defaults)")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int, help="one task per GPU; 0 for CPU-only jobs")
    g.add_argument("--tasks-per-node", type=int, help="tasks per node when --gpus-per-node is 0 (default 1)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--time", help="wall-clock limit per job: minutes, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--mem", help="memory per node, e.g. 64G")
    g.add_argument("--constraint")
    g.add_argument("--exclude", help="nodes to avoid, e.g. gpu[03,07]")
    g.add_argument("--max-requeues", type=int, help="times a job may hit its time limit and be requeued")
    parser.add_argument("--job-dir", type=Path, help="submitit's folder: scripts, logs, pickles (default RUN_DIR/slurm)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    parser.add_argument("--local", action="store_true", help="run on this machine even where Slurm is available")


def minutes(text) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up."""
    text = str(text).strip()
    try:
        days, _, rest = text.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if len(parts) > 3 or min(parts) < 0:
            raise ValueError
        if days:  # D-H, D-H:M, D-H:M:S
            hours, mins, secs = (parts + [0, 0])[:3]
        elif len(parts) == 3:  # H:M:S
            hours, mins, secs = parts
        else:  # M or M:S
            hours, mins, secs = 0, parts[0], parts[1] if len(parts) == 2 else 0
        return int(days or 0) * 1440 + hours * 60 + mins + (1 if secs else 0)
    except ValueError:
        raise ConfigError(f"--time {text!r} is not minutes, HH:MM:SS or D-HH:MM:SS; write e.g. --time 12:00:00") from None


def resources(args: argparse.Namespace, extra: dict | None = None) -> dict:
    """Built-in defaults < cluster file < extra (a sweep's `slurm:` block) < flags."""
    merged = dict(DEFAULTS)
    path = cluster_file()
    if path.is_file():
        loaded = read_mapping(path, "")
        unknown = sorted(set(loaded) - set(RESOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(RESOURCE_KEYS)}")
        merged.update(loaded)
    for key, value in (extra or {}).items():
        if key not in RESOURCE_KEYS:
            raise ConfigError(f"slurm.{key} is not a resource; the keys are {', '.join(RESOURCE_KEYS)}")
        merged[key] = value
    merged.update({k: v for k, v in vars(args).items() if k in RESOURCE_KEYS and v is not None})
    return merged


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def tasks_per_node(res: dict) -> int:
    return res["gpus_per_node"] if res.get("gpus_per_node") else res.get("tasks_per_node") or 1


def slurm_parameters(res: dict, job_name: str) -> dict:
    """SlurmExecutor parameters (the names of submitit's sbatch writer)."""
    if res.get("gpus_per_node") is None:
        raise ConfigError("--gpus-per-node is not set (flag, or gpus_per_node in the cluster file "
                          f"{cluster_file()}); pass --gpus-per-node 0 for a CPU-only job")
    params = {"job_name": job_name, "nodes": res["nodes"], "ntasks_per_node": tasks_per_node(res),
              "cpus_per_task": res["cpus_per_task"], "time": minutes(res["time"]),
              "signal_delay_s": res["signal_delay_s"], "stderr_to_stdout": True}
    if res["gpus_per_node"]:
        params["gpus_per_node"] = res["gpus_per_node"]
    for key in ("partition", "account", "qos", "mem", "constraint", "exclude", "setup"):
        if res.get(key):
            params[key] = res[key]
    return params


def executor(job_dir: Path, res: dict, job_name: str, local: bool = False):
    """A submitit executor: Slurm if sbatch is here (and not local), else this machine."""
    import submitit
    if slurm_available() and not local:
        ex = submitit.SlurmExecutor(folder=job_dir, max_num_timeout=res["max_requeues"])
        ex.update_parameters(**slurm_parameters(res, job_name))
        return ex
    ex = submitit.LocalExecutor(folder=job_dir)
    # No Slurm: the nodes' tasks all run here.
    ex.update_parameters(nodes=1, tasks_per_node=res["nodes"] * tasks_per_node(res), timeout_min=minutes(res["time"]),
                         gpus_per_node=res.get("gpus_per_node") or 0)
    return ex


def sbatch_script(job_dir: Path, res: dict, job_name: str, array: int | None = None) -> str:
    """The script submitit would hand to sbatch (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit's own writer, so this is what it submits
    params = slurm_parameters(res, job_name)
    if array:
        params["map_count"] = array
    command = f"{sys.executable} -u -m submitit.core._submit {job_dir}"
    return _make_sbatch_string(command=command, folder=job_dir, **params)


def job_alive(job_id: str) -> bool:
    """Whether Slurm still has the job (pending, running, requeued)."""
    if not job_id or not slurm_available():
        return False
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def record_job(run_dir: Path, job_id: str) -> None:
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    (run_dir / "slurm" / "job_id").write_text(job_id + "\n")


def recorded_job(run_dir: Path) -> str:
    path = run_dir / "slurm" / "job_id"
    return path.read_text().strip() if path.is_file() else ""
