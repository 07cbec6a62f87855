"""Where a process learns its rank, world and master: torchrun's variables or Slurm's."""
import os
import socket

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


# A node with InfiniBand to 10.1/16 and a default route over eth0 (/proc/net/route's format).
ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
ib0\t0000010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""
# Debian's /etc/hosts on gpu01: its own name is 127.0.1.1; the other nodes resolve by DNS.
ON_GPU01 = {"gpu01": "127.0.1.1", "gpu02": "10.1.0.8", "gpu03": "10.1.0.9"}


def choose(env, hosts=ON_GPU01, routes=ROUTES, tmp_path=None):
    def resolve(name):
        if name not in hosts:
            raise socket.gaierror(f"unknown host {name}")
        return hosts[name]
    lines = []
    route_file = tmp_path / "route"
    route_file.write_text(routes)
    interface = dist.prepare_gloo_interface(env, str(route_file), resolve, lines.append)
    return interface, lines


SLURM_2_NODES = {"MASTER_ADDR": "gpu01", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]"}


@pytest.mark.parametrize("env, interface, because", [
    (SLURM_2_NODES, "ib0", "the route to node gpu02 (10.1.0.8)"),  # Slurm: the route to another node of the job
    ({"MASTER_ADDR": "gpu01", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, "eth0", "the default route"),  # torchrun
])
def test_a_job_across_nodes_never_binds_gloo_to_loopback(env, interface, because, tmp_path):
    env = dict(env)
    chosen, lines = choose(env, tmp_path=tmp_path)
    assert chosen == interface and env["GLOO_SOCKET_IFNAME"] == interface
    assert lines == [f"gloo binds to {interface} ({because}; MASTER_ADDR gpu01 resolves to this node's loopback "
                     "127.0.1.1)"]


def test_one_node_keeps_loopback_and_nodes_that_share_a_host_too(tmp_path):
    one_node = {"MASTER_ADDR": "gpu01", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "SLURM_NNODES": "2"}
    assert choose(one_node, tmp_path=tmp_path)[0] == "lo"  # torchrun's own count wins over the allocation's
    assert choose({"MASTER_ADDR": "gpu01", "SLURM_NNODES": "1"}, tmp_path=tmp_path)[0] == "lo"
    local_cluster = {"MASTER_ADDR": "node1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]"}
    chosen, lines = choose(local_cluster, {"node1": "127.0.0.1", "node2": "127.0.0.1"}, tmp_path=tmp_path)
    assert chosen == "lo" and "every node of the job" in lines[0]


def test_the_users_interface_is_kept_and_a_node_with_no_way_out_is_refused(tmp_path):
    mine = {**SLURM_2_NODES, "GLOO_SOCKET_IFNAME": "eth7"}
    assert choose(mine, tmp_path=tmp_path) == (None, ["gloo binds to eth7 (GLOO_SOCKET_IFNAME set by the user)"])
    assert mine["GLOO_SOCKET_IFNAME"] == "eth7"
    lo = socket.if_nameindex()[0][1]  # an interface this node has
    nccl = {**SLURM_2_NODES, "NCCL_SOCKET_IFNAME": f"={lo}"}
    assert choose(nccl, tmp_path=tmp_path)[0] is None and nccl["GLOO_SOCKET_IFNAME"] == lo
    excluded = {**SLURM_2_NODES, "NCCL_SOCKET_IFNAME": "^docker,lo"}  # not names gloo can take: the route decides
    assert choose(excluded, tmp_path=tmp_path)[0] == "ib0"
    no_way_out = ROUTES.splitlines()[0] + "\n"
    with pytest.raises(dist.ConfigError, match="no route leaves this node; set GLOO_SOCKET_IFNAME"):
        choose(dict(SLURM_2_NODES), routes=no_way_out, tmp_path=tmp_path)


def test_init_names_the_interface_before_the_rendezvous(monkeypatch, capsys, tmp_path):
    for key in ("GLOO_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        monkeypatch.setenv(key, "")  # restored afterwards, whatever init sets
        monkeypatch.delenv(key)
    for key in ("NCCL_SOCKET_IFNAME", "SLURM_STEP_NUM_NODES", "SLURM_STEP_NODELIST", "LOCAL_WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29500",
                       **SLURM_2_NODES}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "route").write_text(ROUTES)
    monkeypatch.setattr(dist, "ROUTE_FILE", str(tmp_path / "route"))
    monkeypatch.setattr(socket, "gethostbyname", lambda name: ON_GPU01[name])
    bound = []
    monkeypatch.setattr(dist.torch_dist, "init_process_group",
                        lambda *a, **k: bound.append(os.environ["GLOO_SOCKET_IFNAME"]))
    assert dist.init("cpu").world == 2
    assert bound == ["ib0"]  # set before gloo started
    assert "gloo binds to ib0 (the route to node gpu02" in capsys.readouterr().err
