"""Where a process learns its rank, world and master: torchrun's variables or Slurm's."""
import os

import pytest

from bnonly_dist import dist, rendezvous


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("a[1,3],b[002-003]", ["a1", "a3", "b002", "b003"]),
])
def test_slurm_nodelist_expands_in_order(nodelist, hosts):
    assert rendezvous.expand_nodelist(nodelist) == hosts


def test_master_port_is_a_pure_function_of_the_job_id():
    ports = {rendezvous.master_port(str(job)) for job in range(1000, 1100)}
    assert rendezvous.master_port("123456") == rendezvous.master_port("123456")  # a requeued job meets again
    assert all(20_000 <= p < 32_768 for p in ports) and len(ports) > 90  # below the ephemeral range


def test_slurm_variables_become_torchrun_ones():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "777",
           "SLURM_JOB_NODELIST": "gpu[03-06]"}
    assert rendezvous.environment(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
                                     "MASTER_PORT": str(rendezvous.master_port("777"))}
    assert rendezvous.environment({**env, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"  # an explicit choice wins


def test_torchrun_variables_win_and_one_task_is_one_process():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert rendezvous.environment(torchrun)["RANK"] == "1"
    assert rendezvous.environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})["WORLD_SIZE"] == "1"
    assert rendezvous.environment({})["WORLD_SIZE"] == "1"


def test_a_single_process_leaves_the_environment_alone(monkeypatch):
    """Else jobs it launches (sbatch inherits the environment) would each think they are rank 0 of 1."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    ctx = dist.init("cpu")
    assert ctx.world == 1 and "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
