"""The launchers before they launch, without a cluster: refusals, where the job runs, failures.

"No Slurm" is a PATH without sbatch; a fake Slurm is a PATH whose sinfo prints canned
partitions and whose sbatch records that it was called.
"""
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnonly_dist.config import ConfigError
from bnonly_dist.launch import preflight

REPO = Path(__file__).resolve().parents[1]
CIFAR = "configs/cifar10_resnet14.yaml"
SINFO = """gpu* 4 gpu:a100:8(S:0-1) 64 1-infinite
gpu* 2 gpu:a100:4(S:0) 64 1-infinite
cpu 16 (null) 128 1-8
"""


def tiny(cifar_root, tmp_path, *extra):
    return [f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "optim.epochs=1", "train.device=cpu",
            "train.progress=lines", f"runs_root={tmp_path / 'runs'}", *extra]


def launch(script, *args, env, stdin=subprocess.DEVNULL):
    return subprocess.run([sys.executable, str(REPO / "launchers" / script), *map(str, args)], cwd=REPO, env=env,
                          stdin=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture
def no_slurm(tmp_path):
    """An environment without sbatch on the PATH and without a cluster file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}",
            "BNONLY_CLUSTER_FILE": str(tmp_path / "no-cluster.yaml")}


@pytest.fixture
def fake_slurm(no_slurm, tmp_path):
    """sinfo answers SINFO (or fails with sinfo_rc), sbatch leaves tmp_path/sbatch-called and returns job 77."""
    bin_dir = Path(no_slurm["PATH"].split(":")[0])

    def make(sinfo=SINFO, sinfo_rc=0):
        (bin_dir / "sinfo").write_text(f"#!/bin/sh\nprintf '%s' '{sinfo}'\nexit {sinfo_rc}\n")  # builtins only
        (bin_dir / "sbatch").write_text(f"#!/bin/sh\n: > {tmp_path / 'sbatch-called'}\necho 'Submitted batch job 77'\n")
        (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; never run here
        for tool in ("sinfo", "sbatch", "srun"):
            (bin_dir / tool).chmod(0o755)
        return no_slurm
    return make


def test_headline_command_names_every_refusal_in_one_go(no_slurm, fake_slurm, imagenet_root, tmp_path):
    no_root = "submit: error: data.root is not set for data.name=imagenet; pass data.root=/path/to/imagenet"
    no_gpus = "submit: error: --gpus-per-node is not set (flag, or gpus_per_node in the cluster file"
    headline = ["--nodes", 8, "configs/imagenet_resnet200.yaml", f"runs_root={tmp_path / 'runs'}"]
    # No Slurm, no terminal: no data.root, and a CPU fallback of ResNet-200 nobody can confirm.
    out = launch("submit.py", *headline, env=no_slurm)
    errors = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(errors) == 2 and errors[0] == no_root, out.stdout + out.stderr
    assert errors[1].startswith("submit: error: no Slurm here: imagenet_resnet_200 on this machine's CPU: 1 process(es) "
                                "of 1024 images per step, whose backward keeps about ")
    assert re.search(r"GiB each with plain autograd; the lean path keeps about half \(this machine has \d+ GiB of "
                     r"memory\), more than 50% of it: not started", errors[1]), errors[1]
    assert errors[1].endswith("not started without a terminal to confirm it; pass --local to run it here anyway, or "
                              "submit where Slurm is (a small trial: README, Trying an ImageNet config)")
    # Slurm: no data.root, 8 nodes of a partition of 6 and no --gpus-per-node; then a batch larger than the data.
    env = fake_slurm()
    too_many = "submit: error: --nodes 8 but partition gpu has 6 node(s); ask for at most 6"
    out = launch("submit.py", *headline, env=env)
    errors = out.stderr.strip().splitlines()
    assert out.returncode == 2 and errors[:2] == [no_root, too_many] and errors[2].startswith(no_gpus), errors
    assert len(errors) == 3
    out = launch("submit.py", *headline, f"data.root={imagenet_root}", env=env)
    errors = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(errors) == 3 and errors[1] == too_many and errors[2].startswith(no_gpus), errors
    assert errors[0] == "submit: error: data.batch_size=1024 exceeds the 32 training images; lower it"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sbatch-called").exists()


@pytest.mark.parametrize("flags, message", [
    (["--nodes", 8, "--gpus-per-node", 8], "--nodes 8 but partition gpu has 6 node(s); ask for at most 6"),
    (["--nodes", 5, "--gpus-per-node", 8], "--gpus-per-node 8 but only 4 of the nodes of partition gpu have 8 GPUs"),
    (["--gpus-per-node", 8, "--cpus-per-task", 10], "8 task(s) x --cpus-per-task 10 = 80 CPUs per node, but no nodes"),
    (["--partition", "cpu", "--gpus-per-node", 2], "--gpus-per-node 2 but no nodes of partition cpu have 2 GPUs"),
    (["--partition", "cpu", "--gpus-per-node", 0, "--nodes", 9], "partition cpu allows at most 8 nodes per job"),
    (["--partition", "nope", "--gpus-per-node", 0], "partition 'nope' does not exist here; sinfo lists cpu, gpu"),
])
def test_a_request_the_cluster_cannot_meet_is_refused_before_sbatch(fake_slurm, cifar_root, tmp_path, flags, message):
    out = launch("submit.py", *flags, CIFAR, *tiny(cifar_root, tmp_path), env=fake_slurm())
    errors = out.stderr.strip().splitlines()  # every refusal, the request's first (a batch the world does not divide next)
    assert out.returncode == 2 and message in errors[0] and all(e.startswith("submit: error: ") for e in errors), errors
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sbatch-called").exists()


def test_every_mismatch_with_the_partition_is_named_at_once(fake_slurm, cifar_root, tmp_path):
    out = launch("submit.py", "--nodes", 8, "--gpus-per-node", 16, "--cpus-per-task", 10, CIFAR,
                 *tiny(cifar_root, tmp_path), env=fake_slurm())
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "submit: error: --nodes 8 but partition gpu has 6 node(s); ask for at most 6",
        "submit: error: --gpus-per-node 16 but no nodes of partition gpu have 16 GPUs (most: 8); ask for at most 8 per "
        "node",
        "submit: error: 16 task(s) x --cpus-per-task 10 = 160 CPUs per node, but no nodes of partition gpu have that "
        "many (most: 64); lower --cpus-per-task",
        "submit: error: data.batch_size=32 is the global batch and must divide by the world size 128; choose a "
        "multiple of 128"], out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sbatch-called").exists()


def test_a_request_the_cluster_can_meet_is_submitted(fake_slurm, cifar_root, tmp_path):
    args = ["--nodes", 2, "--gpus-per-node", 8, "--cpus-per-task", 8, CIFAR, *tiny(cifar_root, tmp_path)]
    out = launch("submit.py", *args, env=fake_slurm())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "job 77 on Slurm (16 tasks)" in out.stdout and "data: cifar10 at" in out.stdout
    assert (tmp_path / "sbatch-called").exists() and len(list((tmp_path / "runs").glob("*/slurm/job_id"))) == 1
    # where sinfo cannot answer, the launcher says so and goes on
    (tmp_path / "sbatch-called").unlink()
    out = launch("submit.py", *args, "seed=1", env=fake_slurm(sinfo="", sinfo_rc=1))
    assert out.returncode == 0 and "the request is not checked against the cluster" in out.stdout
    assert (tmp_path / "sbatch-called").exists()


def test_sinfo_lines_are_read_robustly():
    parts = preflight.parse_sinfo("gpu* 2 gpu:a:2,gpu:b:2(S:0,1) 32 1-infinite\nweird line\n"
                                  "debug 3 (null) 48+ 2-4\nmixed 1 gpu:4,nvme:1 16 infinite\n")
    assert parts["gpu"].default and parts["gpu"].groups[0].gpus == 4 and parts["gpu"].max_nodes is None
    assert parts["debug"].groups[0].cpus == 48 and parts["debug"].max_nodes == 4 and parts["debug"].groups[0].gpus == 0
    assert parts["mixed"].groups[0].gpus == 4 and set(parts) == {"gpu", "debug", "mixed"}


def test_of_several_partitions_one_that_fits_is_enough():
    res = {"nodes": 4, "gpus_per_node": 8, "cpus_per_task": 4, "partition": "cpu,gpu"}
    ran = subprocess.CompletedProcess([], 0, SINFO, "")
    assert preflight.check_cluster(res, run=lambda *a, **k: ran) is None
    with pytest.raises(ConfigError, match="partition cpu have 8 GPUs"):
        preflight.check_cluster({**res, "partition": "cpu"}, run=lambda *a, **k: ran)


def test_a_path_only_the_nodes_see_is_said_and_not_checked(fake_slurm, tmp_path):
    out = launch("submit.py", "--gpus-per-node", 8, "--cpus-per-task", 8, "configs/imagenet_resnet200.yaml",
                 "data.root=/nodes/only/imagenet", f"runs_root={tmp_path / 'runs'}", env=fake_slurm())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "data.root=/nodes/only/imagenet is not visible on this machine: not checked here" in out.stdout


@pytest.mark.parametrize("extra, message", [
    (["data.root=/nonexistent/cifar"], "/nonexistent/cifar does not exist"),
    (["data.batch_size=33", "train.bn_batch=33", "--local", "--tasks-per-node", 2], "must divide by the world size 2"),
    (["data.batch_size=640", "train.bn_batch=640"], "data.batch_size=640 exceeds the 320 training images"),
    (["data.name=imagenet"], "holds cifar10 but data.name=imagenet"),
    (["train.device=cuda"], "train.device=cuda but the job gets no GPU"),
    (["optim.lr=-1"], "config key 'optim.lr'"),
])
def test_a_refused_launch_leaves_nothing_behind(no_slurm, cifar_root, tmp_path, extra, message):
    out = launch("submit.py", "--gpus-per-node", 0, CIFAR, *tiny(cifar_root, tmp_path), *extra, env=no_slurm)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stdout + out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_run_dir_of_another_config_is_refused_untouched(no_slurm, cifar_root, tmp_path):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 5\ndata: {root: /elsewhere}\n")
    before = sorted(run_dir.rglob("*"))
    out = launch("submit.py", CIFAR, *tiny(cifar_root, tmp_path), "--run-dir", run_dir, env=no_slurm)
    assert out.returncode == 2 and "holds a run with" in out.stderr, out.stdout + out.stderr
    assert sorted(run_dir.rglob("*")) == before and (run_dir / "config.yaml").read_text().startswith("seed: 5")


def test_without_slurm_the_job_runs_as_what_the_machine_holds(no_slurm, cifar_root, tmp_path):
    out = launch("submit.py", "--nodes", 2, "--tasks-per-node", 2, "--gpus-per-node", 0, CIFAR,
                 *tiny(cifar_root, tmp_path, "train.max_steps=2"), "--run-dir", tmp_path / "run", env=no_slurm)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("no Slurm here (no sbatch on the PATH): running 1 process, on the CPU (what this machine holds), "
            "not the requested 4 (2 node(s) x 2 task(s)); pass --local to run all 4 here") in out.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world"] == 1


def test_at_a_terminal_the_requested_count_is_confirmed(no_slurm, cifar_root, tmp_path):
    """Answering y runs all 2 x 2 here (seen in the world size the batch must divide by)."""
    master, terminal = pty.openpty()
    os.write(master, b"y\n")
    try:
        out = launch("submit.py", "--nodes", 2, "--tasks-per-node", 2, "--gpus-per-node", 0, CIFAR,
                     *tiny(cifar_root, tmp_path, "data.batch_size=30", "train.bn_batch=30"), env=no_slurm, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(master)
    assert "run all 4 processes (2 node(s) x 2 task(s)) on this machine? [y/N]" in out.stdout
    assert out.returncode == 2 and "must divide by the world size 4" in out.stderr, out.stdout + out.stderr


def test_a_failed_local_job_prints_the_decision_not_a_traceback(no_slurm, cifar_root, tmp_path):
    """A failure not retried ends the console in the decision, which names the rank's own error."""
    out = launch("submit.py", CIFAR, *tiny(cifar_root, tmp_path, "model.num_classes=5", "train.max_steps=2"),
                 "--run-dir", tmp_path / "run", env=no_slurm)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "bnonly: attempt 1 failed at step 0 (rank 0: DataError: model.num_classes=5 is smaller than the 10 classes in "
        f"{cifar_root}; set model.num_classes=10 (or leave it unset: the data's count)); not retried: never retried: "
        f"a config, command-line, run-directory or data-set error (exit 2); see {tmp_path / 'run' / 'history.jsonl'}"]


def test_sweep_refusal_leaves_no_run_dirs(no_slurm, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"config: {REPO / CIFAR}\ngrid: {{seed: [0, 1]}}\noverrides: {{runs_root: {tmp_path / 'runs'}}}\n")
    out = launch("sweep.py", spec, env=no_slurm)
    assert out.returncode == 2 and "data.root is not set" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["submit.py", "sweep.py"])
def test_help_loads_neither_torch_nor_submitit(script):
    probe = ("import runpy, sys\n"
             f"sys.argv = ['{script}', '--help']\n"
             "try:\n"
             f"    runpy.run_path('launchers/{script}', run_name='__main__')\n"
             "except SystemExit as done:\n"
             "    print('exit', done.code, sorted({'torch', 'submitit', 'pydantic'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "--signal-delay-s" in out.stdout and out.stdout.strip().endswith("exit 0 []"), out.stdout + out.stderr


def test_sweep_help_names_its_job_dir_default():
    out = subprocess.run([sys.executable, "launchers/sweep.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert "RUNS_ROOT/sweeps/<sweep file name>" in " ".join(out.stdout.split())


def test_the_documented_dry_run_works_without_a_cluster_file(fake_slurm):
    doc = (REPO / "docs" / "cluster.md").read_text()
    command = re.search(r"^python launchers/submit\.py --dry-run .*?(?=\s+#|$)", doc, re.M).group()
    out = subprocess.run([sys.executable, *command.split()[1:]], cwd=REPO, env=fake_slurm(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH" in out.stdout and "is not visible on this machine" in out.stdout
    run_dir = Path(re.search(r"# run directory: (\S+)", out.stdout).group(1))
    assert not run_dir.exists()


def test_without_slurm_a_gpu_machine_runs_one_process_per_gpu(monkeypatch):
    from bnonly_dist.launch import cluster
    monkeypatch.setattr(cluster, "slurm_available", lambda: False)
    monkeypatch.setattr(cluster, "local_gpus", lambda: 4)
    res = {"nodes": 8, "gpus_per_node": 8}
    target, line = cluster.choose_target(res, "auto")
    assert (target.world, target.gpus_per_node, target.slurm) == (4, 4, False)
    assert "running 4 processes, one per GPU (what this machine holds), not the requested 64" in line
    asked = []
    target, _ = cluster.choose_target(res, "auto", ask=lambda q: asked.append(q) or True)
    assert target.world == 64 and "run all 64 processes (8 node(s) x 8 task(s))" in asked[0]
    assert cluster.choose_target(res, "cpu")[0].world == 1  # train.device=cpu: one process, GPUs or not
    assert cluster.choose_target({"nodes": 1, "gpus_per_node": None}, "auto")[0].world == 4


def test_without_slurm_a_dry_run_says_what_the_command_does_here(no_slurm, cifar_root, tmp_path):
    args = ["--dry-run", "--nodes", 2, "--gpus-per-node", 0, CIFAR, *tiny(cifar_root, tmp_path)]
    out = launch("submit.py", *args, env=no_slurm)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no Slurm here (no sbatch on the PATH): running 1 process, on the CPU (what this "
                                 "machine holds), not the requested 2 (2 node(s) x 1 task(s)); pass --local to run "
                                 "all 2 here\n")
    assert "# dry run: the command would run here with submitit's local executor, 1 process as said above" in out.stdout
    assert "#SBATCH" not in out.stdout and not (tmp_path / "runs").exists()
    out = launch("submit.py", "--local", *args, env=no_slurm)  # --local: all of them
    assert out.returncode == 0 and "local executor, 2 processes as said above" in out.stdout, out.stderr


def test_the_readme_imagenet_trial_goes_through_the_launcher(no_slurm, imagenet_root, tmp_path):
    """The README's small trial, which the refusal of a large CPU fallback points at, is not refused itself."""
    readme = (REPO / "README.md").read_text()
    trial = re.search(r"^bnonly train (configs/imagenet\S+) (data.root=/tmp/fake-in .*)$", readme, re.M)
    overrides = [o.replace("/tmp/fake-in", str(imagenet_root)) for o in trial.group(2).split()]
    out = launch("submit.py", "--dry-run", trial.group(1), *overrides, f"runs_root={tmp_path / 'runs'}", env=no_slurm)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^imagenet_resnet_50 on this machine's CPU: 1 process\(es\) of 32 images per step, whose "
                     r"backward keeps about [\d.]+ GiB each with plain autograd.* \(this machine has \d+ GiB of "
                     r"memory\)$", out.stdout, re.M), out.stdout
