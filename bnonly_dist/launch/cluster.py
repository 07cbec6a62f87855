"""Submitting runs with submitit: resources, where the tasks run, the executor, job records.

Cluster defaults (partition, account, gpus_per_node, setup lines, ...) live in an
optional YAML file, ~/.config/bnonly/cluster.yaml or $BNONLY_CLUSTER_FILE, with the same
keys as the flags (underscores), so nobody edits code per cluster. Without `sbatch` on
the PATH the job runs on this machine with submitit's local executor: as one process
group of the size the machine holds, unless --local (or a confirmation) asks for the
requested nodes x tasks.

Only the standard library at import: the launchers' --help must not wait for torch,
pydantic or submitit.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bnonly_dist.run.paths import RunPaths

RESOURCE_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "partition", "account", "qos", "time",
                 "mem", "constraint", "exclude", "setup", "max_requeues", "max_failures", "signal_delay_s")
# --cpus-per-task comes from the partition (preflight.settle_cpus_per_task); DEFAULT_CPUS_PER_TASK only where
# sinfo cannot say, and in a script previewed without Slurm.
DEFAULTS = {"nodes": 1, "time": "24:00:00", "max_requeues": 3, "max_failures": 3, "signal_delay_s": 120}
DEFAULT_CPUS_PER_TASK = 4
LOWEST = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "gpus_per_node": 0, "max_requeues": 0,
          "max_failures": 0, "signal_delay_s": 0}  # the smallest value each number of a request may take
ERROR_TAIL_LINES = 12  # of a failed task's stderr log: the traceback's last frames and the error itself


def _config_error(message: str) -> Exception:
    from bnonly_dist.config import ConfigError  # lazily: config loads pydantic (and today torch)
    return ConfigError(message)


def cluster_file() -> Path:
    return Path(os.environ.get("BNONLY_CLUSTER_FILE", "~/.config/bnonly/cluster.yaml")).expanduser()


def add_resource_arguments(parser: argparse.ArgumentParser, job_dir_default: str = "RUN_DIR/slurm") -> None:
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
    g.add_argument("--max-failures", type=int,
                   help="times a failed job (a lost rank or node, a timed-out collective) restarts from its last "
                        "checkpoint (default 3; 0: never); config, data and diverged-loss errors are never retried")
    g.add_argument("--signal-delay-s", type=int,
                   help="seconds before the time limit at which Slurm sends SIGUSR2 (save and requeue; default 120)")
    parser.add_argument("--job-dir", type=Path, help=f"submitit's folder: scripts, logs, pickles (default {job_dir_default})")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and data, print the sbatch script, submit and create nothing")
    parser.add_argument("--local", action="store_true",
                        help="run all nodes x tasks on this machine (also where Slurm is available)")


SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+(?::\d+){0,2})")  # [D-]H[:M[:S]] or M[:S]: digits only, no sign


def minutes(text) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up.
    Anything else (a sign, a unit, an empty field, too many fields) is refused, never reread as another time."""
    text = str(text).strip()
    match = SLURM_TIME.fullmatch(text)
    if not match:
        raise _config_error(f"--time {text!r} is not minutes, HH:MM:SS or D-HH:MM:SS; write e.g. --time 12:00:00")
    days, parts = match.group(1), [int(p) for p in match.group(2).split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        hours, mins, secs = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # H:M:S
        hours, mins, secs = parts
    else:  # M or M:S
        hours, mins, secs = 0, parts[0], parts[1] if len(parts) == 2 else 0
    return int(days or 0) * 1440 + hours * 60 + mins + (1 if secs else 0)


def resources(args: argparse.Namespace, extra: dict | None = None) -> dict:
    """Built-in defaults < cluster file < extra (a sweep's `slurm:` block) < flags."""
    from bnonly_dist.config import read_mapping
    merged = dict(DEFAULTS)
    path = cluster_file()
    if path.is_file():
        loaded = read_mapping(path, "")
        unknown = sorted(set(loaded) - set(RESOURCE_KEYS))
        if unknown:
            raise _config_error(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(RESOURCE_KEYS)}")
        merged.update(loaded)
    for key, value in (extra or {}).items():
        if key not in RESOURCE_KEYS:
            raise _config_error(f"slurm.{key} is not a resource; the keys are {', '.join(RESOURCE_KEYS)}")
        merged[key] = value
    merged.update({k: v for k, v in vars(args).items() if k in RESOURCE_KEYS and v is not None})
    check_numbers(merged)
    return merged


def check_numbers(res: dict) -> None:
    """Every number of a request in range (flags and cluster file alike), before anything else uses them."""
    for key, lowest in LOWEST.items():
        value = res.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            flag = "--" + key.replace("_", "-")
            raise _config_error(f"{flag} {value}: must be a whole number of at least {lowest} (flag, or {key} in "
                                f"the cluster file {cluster_file()}); e.g. {flag} {max(lowest, DEFAULTS.get(key, 1))}")
    if minutes(res["time"]) < 1:
        raise _config_error(f"--time {res['time']}: a job needs at least one minute; write e.g. --time 12:00:00")


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def slurm_expected(local: bool) -> bool:
    """Whether a launch (or its dry run: the same answer) will go to Slurm (choose_target's first rule)."""
    return slurm_available() and not local


def slurm_gpus(res: dict) -> int:
    """GPUs per node of a Slurm job: it must be said (0 for CPU jobs), never guessed."""
    if res.get("gpus_per_node") is None:
        raise _config_error("--gpus-per-node is not set (flag, or gpus_per_node in the cluster file "
                            f"{cluster_file()}); pass --gpus-per-node 0 for a CPU-only job")
    return res["gpus_per_node"]


def tasks_per_node(res: dict) -> int:
    return res["gpus_per_node"] if res.get("gpus_per_node") else res.get("tasks_per_node") or 1


@dataclass(frozen=True)
class Target:
    """Where a job's tasks run: Slurm nodes, or one process group on this machine."""
    slurm: bool
    nodes: int
    tasks_per_node: int
    gpus_per_node: int  # GPUs each node gives its tasks; 0: the tasks run on the CPU
    cpus_per_task: int | None = None  # Slurm's grant per task; None here: the machine's cores shared by the tasks

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def where(self) -> str:
        return "Slurm" if self.slurm else "this machine"


def local_gpus() -> int:
    import torch  # lazily: only a launch that goes ahead needs it
    return torch.cuda.device_count()


def _plural(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 'es'}"


def choose_target(res: dict, device: str, local: bool = False, ask=None) -> tuple[Target, str | None]:
    """The Target of a launch and the line to print about it (None for a plain Slurm job).

    device is the config's train.device. Without Slurm and without --local the job runs as
    the process group this machine holds (one per GPU, or one on the CPU); ask(question)
    -> bool, given only where a person can answer, may agree to the requested count instead.
    """
    if slurm_expected(local):
        return Target(True, res["nodes"], tasks_per_node(res), slurm_gpus(res),
                      res.get("cpus_per_task") or DEFAULT_CPUS_PER_TASK), None
    here = 0 if device == "cpu" else local_gpus()
    requested = res["nodes"] * tasks_per_node(res)
    gpus = here if res.get("gpus_per_node") is None else min(here, res["gpus_per_node"])
    asked = f"{res['nodes']} node(s) x {tasks_per_node(res)} task(s)"
    if local:
        return Target(False, 1, requested, gpus), f"--local: {_plural(requested, 'process')} ({asked}) on this machine"
    held = here or 1
    what = f"{_plural(held, 'process')}, " + ("one per GPU" if here else "on the CPU")
    why = "no Slurm here (no sbatch on the PATH)"
    if requested == held:
        return Target(False, 1, held, here), f"{why}: running on this machine as {what}"
    if ask is not None and ask(f"{why}: run all {_plural(requested, 'process')} ({asked}) on this machine? [y/N] "):
        return Target(False, 1, requested, gpus), f"running {_plural(requested, 'process')} ({asked}) on this machine"
    return Target(False, 1, held, here), (f"{why}: running {what} (what this machine holds), not the requested "
                                          f"{requested} ({asked}); pass --local to run all {requested} here")


def terminal_ask():
    """ask() for choose_target where a person is at the terminal; None where nobody can answer (CI, cron)."""
    if not sys.stdin.isatty():
        return None

    def ask(question: str) -> bool:
        print(question, end="", flush=True)
        try:
            # Not input(): a Ctrl-C that lands after the question is written and before the read begins would
            # only be seen once a line comes. select() returns to Python every ASK_POLL_S, where it is seen.
            while not select.select([sys.stdin], [], [], ASK_POLL_S)[0]:
                pass
            return sys.stdin.readline().strip().lower() in ("y", "yes")  # "" at the end of input: no
        except KeyboardInterrupt:
            print(flush=True)  # the launcher's one line goes below the question, not after it
            raise
    return ask


ASK_POLL_S = 0.2  # how soon a Ctrl-C at the [y/N] question ends it, however it lands


def slurm_parameters(res: dict, job_name: str) -> dict:
    """SlurmExecutor parameters (the names of submitit's sbatch writer)."""
    slurm_gpus(res)
    # stdout and stderr apart, as the local executor keeps them: a failure is read from the .err log.
    params = {"job_name": job_name, "nodes": res["nodes"], "ntasks_per_node": tasks_per_node(res),
              "cpus_per_task": res.get("cpus_per_task") or DEFAULT_CPUS_PER_TASK, "time": minutes(res["time"]),
              "signal_delay_s": res["signal_delay_s"]}
    if res["gpus_per_node"]:
        params["gpus_per_node"] = res["gpus_per_node"]
    for key in ("partition", "account", "qos", "mem", "constraint", "exclude", "setup"):
        if res.get(key):
            params[key] = res[key]
    return params


def executor(job_dir: Path, res: dict, job_name: str, target: Target):
    """A submitit executor for target: Slurm's, or the local one with target.world tasks."""
    import submitit
    if target.slurm:
        ex = submitit.SlurmExecutor(folder=job_dir, max_num_timeout=res["max_requeues"])
        ex.update_parameters(**slurm_parameters(res, job_name))
        return ex
    ex = submitit.LocalExecutor(folder=job_dir)
    ex.update_parameters(nodes=1, tasks_per_node=target.world, timeout_min=minutes(res["time"]),
                         gpus_per_node=target.gpus_per_node)
    return ex


class SubmissionError(RuntimeError):
    """sbatch (or the local executor) refused a job that passed every check here."""


@contextlib.contextmanager
def created(*run_dirs: Path):
    """Remove the run directories that did not exist before, if the submission inside fails.

    Only a job that was never submitted is undone: nothing else has written there yet.
    """
    new = [Path(d) for d in run_dirs if not Path(d).exists()]
    try:
        yield
    except Exception as err:
        for run_dir in new:
            shutil.rmtree(run_dir, ignore_errors=True)
        from bnonly_dist.config import ConfigError
        if isinstance(err, ConfigError):
            raise
        said = str(err).strip().splitlines()
        raise SubmissionError(f"the job was not submitted: {said[-1] if said else type(err).__name__}") from err


def sbatch_script(job_dir: Path, res: dict, job_name: str, array: int | None = None,
                  array_parallelism: int | None = None) -> str:
    """The script submitit would hand to sbatch (for --dry-run); array: tasks of a job array, array_parallelism:
    how many of them run at once (None: submitit's default)."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit's own writer, so this is what it submits
    params = slurm_parameters(res, job_name)
    if array:
        params["map_count"] = array
        if array_parallelism:
            params["array_parallelism"] = array_parallelism
    command = f"{sys.executable} -u -m submitit.core._submit {job_dir}"
    return _make_sbatch_string(command=command, folder=job_dir, **params)


def dry_run_here(target: Target) -> str:
    """What a dry run without Slurm says instead of an sbatch script: the command runs here, as the line above it."""
    return (f"# dry run: the command would run here with submitit's local executor, {_plural(target.world, 'process')} "
            f"as said above; no Slurm, so no sbatch script; nothing was started")


def failure_report(job, err: BaseException | None = None) -> str:
    """The failed job's own error: the tail of its first failing task's stderr log.

    submitit's exception only points at the logs ("Submitted job triggered an exception");
    the traceback and the error are in the task's .err file.
    """
    from bnonly_dist.dist import LOST_CONTACT_MARKS  # torch: imported only once a job has failed
    logs = [job.task(t).paths for t in range(job.num_tasks)]
    failed = []
    for task, paths in enumerate(logs):
        text = paths.stderr.read_text(errors="replace") if paths.stderr.is_file() else ""
        if "Traceback (most recent call last)" in text:
            lost = any(mark in text for mark in LOST_CONTACT_MARKS + ("DistBackendError", "lost contact"))
            failed.append((lost, task, paths.stderr, text))  # a peer's loss is not the cause
    if not failed:  # killed, cancelled, timed out: submitit's own account, then where to look
        said = str(err or "").strip().splitlines()
        return (f"job {job.job_id} failed without a traceback in its logs{': ' + said[0] if said else ''}; "
                f"see {logs[0].stderr} and {logs[0].stdout}")
    _, task, path, text = min(failed)
    tail = "\n".join("  " + line for line in text.rstrip().splitlines()[-ERROR_TAIL_LINES:])
    return f"job {job.job_id} failed; the end of task {task}'s error log {path}:\n{tail}"


def job_alive(job_id: str) -> bool:
    """Whether Slurm still has the job (pending, running, requeued)."""
    if not job_id or not slurm_available():
        return False
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def record_job(run_dir: Path, job_id: str) -> None:
    paths = RunPaths(Path(run_dir))
    paths.slurm.mkdir(parents=True, exist_ok=True)
    paths.job_id.write_text(job_id + "\n")


def recorded_job(run_dir: Path) -> str:
    path = RunPaths(Path(run_dir)).job_id
    return path.read_text().strip() if path.is_file() else ""
