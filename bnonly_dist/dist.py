"""Process-group setup from the launcher's environment, device choice, collectives.

A process learns its place from rendezvous.environment(): torchrun's variables or, under
`srun`, Slurm's. One process per GPU.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import struct
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from bnonly_dist.config import ConfigError
from bnonly_dist.rendezvous import environment, expand_nodelist


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Texts of errors that mean a peer is gone, as gloo and NCCL word them when they reach Python
# (NCCL's come as DistBackendError in recent torch, as plain RuntimeError in older ones).
LOST_CONTACT_MARKS = ("gloo", "NCCL communicator was aborted", "ncclRemoteError", "ncclSystemError",
                      "Watchdog caught collective operation timeout", "remote process exited")


def lost_contact(err: BaseException) -> bool:
    """Whether an error means the ranks lost each other (a dead, hung or unreachable peer)."""
    return isinstance(err, torch_dist.DistError) or (
        isinstance(err, RuntimeError) and any(mark in str(err) for mark in LOST_CONTACT_MARKS))


def prepare_environment(deterministic: bool, env=os.environ) -> None:
    """Variables CUDA libraries read once, when they start: set before the first CUDA call.

    - CUBLAS_WORKSPACE_CONFIG: cuBLAS refuses deterministic mode without it (a RuntimeError
      at the first matmul under torch.use_deterministic_algorithms).
    - TORCH_NCCL_ASYNC_ERROR_HANDLING: NCCL's watchdog tears the process down when a
      collective fails or outlives dist.timeout_s, so no rank waits forever on a dead peer
      (0 would leave it hanging; a user's 1, 2 or 3 is kept).
    """
    if deterministic:
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", env.get("NCCL_ASYNC_ERROR_HANDLING", "0")) not in ("1", "2", "3"):
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"


ROUTE_FILE = "/proc/net/route"  # Linux's main route table; absent elsewhere (then gloo chooses)


def _up_routes(route_table: str):
    """(interface, destination, mask, metric) of each route that is up, from a route table as
    /proc/net/route writes it (hex, little-endian)."""
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or not int(fields[3], 16) & 1:  # RTF_UP
            continue
        dest, mask = (ipaddress.IPv4Address(struct.pack("<I", int(f, 16))) for f in (fields[1], fields[7]))
        yield fields[0], int(dest), int(mask), int(fields[6])


def route_interface(address: str, route_table: str) -> str | None:
    """The interface Linux sends packets to address through: the longest-prefix match in the
    route table, lowest metric first; "lo" for a loopback address (its route is in the local
    table, not listed there). 0.0.0.0 gives the default route's interface."""
    ip = ipaddress.IPv4Address(address)
    if ip.is_loopback:
        return "lo"
    best = None
    for interface, dest, mask, metric in _up_routes(route_table):
        if int(ip) & mask == dest:
            key = (bin(mask).count("1"), -metric)
            if best is None or key > best[0]:
                best = (key, interface)
    return best[1] if best else None


def spans_nodes(env=os.environ) -> bool:
    """Whether the job's ranks run on more than one node: torchrun's world larger than one
    node's (LOCAL_WORLD_SIZE), else Slurm's node count of the step (or of the job)."""
    if "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"]) > int(env["LOCAL_WORLD_SIZE"])
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or "1"
    return int(nodes) > 1


def _user_interfaces(env) -> tuple[str, str] | None:
    """(interfaces, variable) the user chose: GLOO_SOCKET_IFNAME, or NCCL_SOCKET_IFNAME when it
    names whole interfaces of this node ("=eth0" or "eth0,ib0"; NCCL's prefixes and "^"
    exclusions are not names gloo can take, so then the route decides for gloo)."""
    if env.get("GLOO_SOCKET_IFNAME"):
        return env["GLOO_SOCKET_IFNAME"], "GLOO_SOCKET_IFNAME"
    names = env.get("NCCL_SOCKET_IFNAME", "").lstrip("=")
    try:
        here = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    if names and not names.startswith("^") and set(names.split(",")) <= here:
        return names, "NCCL_SOCKET_IFNAME"
    return None


def choose_gloo_interface(env, route_table: str, resolve=socket.gethostbyname) -> tuple[str | None, str]:
    """(interface for GLOO_SOCKET_IFNAME, why) from the route to MASTER_ADDR; None: gloo's own choice.

    Across nodes a loopback interface is never right, and it is what the route gives where the
    master's host name resolves to this node's loopback (Debian and Ubuntu map a node's own
    name to 127.0.1.1): gloo would bind to lo and the other nodes would wait on it until
    dist.timeout_s. Then the route to another node of the job decides (Slurm's node list),
    else the default route. Only when every node of the job resolves to a loopback address
    do the nodes share this host (a local test cluster), and lo is right."""
    master = env["MASTER_ADDR"]
    address = resolve(master)
    interface = route_interface(address, route_table)
    if interface != "lo" or not spans_nodes(env):
        return interface, f"the route to MASTER_ADDR {master} ({address})"
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "")
    addresses = {}
    for node in nodes:
        try:
            addresses[node] = resolve(node)
        except OSError:
            continue
    why = f"MASTER_ADDR {master} resolves to this node's loopback {address}"
    if nodes and len(addresses) == len(nodes) and all(ipaddress.ip_address(a).is_loopback for a in addresses.values()):
        return "lo", f"{why}, as every node of the job does: they share this host"
    for node, peer in addresses.items():
        through = route_interface(peer, route_table)
        if through and through != "lo":
            return through, f"the route to node {node} ({peer}); {why}"
    through = route_interface("0.0.0.0", route_table)
    if through and through != "lo":
        return through, f"the default route; {why}"
    raise ConfigError(f"the job spans nodes but {why} and no route leaves this node; set GLOO_SOCKET_IFNAME "
                      "to the interface the nodes reach each other through")


def prepare_gloo_interface(env=os.environ, route_file: str | None = None, resolve=None,
                           say=lambda line: None) -> str | None:
    """GLOO_SOCKET_IFNAME, when the user set neither it nor NCCL_SOCKET_IFNAME, from the route
    (choose_gloo_interface): gloo would otherwise bind to what the host name resolves to,
    which on some nodes is a loopback or unroutable address, and its first collective would
    block until dist.timeout_s. say(line) gets one line naming the interface and why.
    Returns the interface chosen (None: the user's setting is kept, or no route is known)."""
    if not env.get("MASTER_ADDR"):
        return None
    mine = _user_interfaces(env)
    if mine:
        env["GLOO_SOCKET_IFNAME"] = mine[0]
        say(f"gloo binds to {mine[0]} ({mine[1]} set by the user)")
        return None
    try:
        with open(route_file or ROUTE_FILE) as f:
            interface, why = choose_gloo_interface(env, f.read(), resolve or socket.gethostbyname)
    except ConfigError:
        raise
    except (OSError, ValueError):  # unresolvable name, no route table (not Linux): gloo's own choice
        say("gloo binds to its own choice of interface (no route to MASTER_ADDR known here)")
        return None
    if interface:
        env["GLOO_SOCKET_IFNAME"] = interface
    say(f"gloo binds to {interface or 'its own choice of interface'} ({why})")
    return interface


def choose_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    # Slurm's --gpus-per-task shows each task only its own GPU (index 0 whatever SLURM_LOCALID
    # is); torchrun shows all of them. Everything after this uses ctx.device, never local_rank.
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


_control_group = None  # gloo group for host-side agreement (stop flags) without a GPU sync
_bn_groups: dict = {}  # ranks per BN group -> this rank's group (bn_group)


def device_local_rank(device: torch.device, local_rank: int) -> str:
    """LOCAL_RANK as libraries that pick their GPU from it (DeepSpeed) must see it: the index
    of the device this process chose, which differs from the launcher's local rank when
    each task sees only its own GPU."""
    return str(device.index) if device.type == "cuda" else str(local_rank)


def announce(line: str) -> None:
    """A start-up line on stderr, before logging is set up (and before a hang it may explain)."""
    print(f"dist: {socket.gethostname()}: {line}", file=sys.stderr, flush=True)


def init(device_preference: str = "auto", timeout_s: int = 600, deterministic: bool = False) -> Context:
    """Join the process group the launcher describes (a single process if none).

    Every collective, including the rendezvous, fails after timeout_s instead of hanging
    when a rank has died or hung. deterministic: prepare cuBLAS for
    torch.use_deterministic_algorithms (before the first CUDA call, which is here).
    """
    global _control_group
    prepare_environment(deterministic)
    env = environment()
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    device = choose_device(device_preference, local_rank)
    if device.type == "cpu" and os.environ.get("SLURM_CPUS_PER_TASK"):
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))  # not every core of a shared node
    if world > 1 and not torch_dist.is_initialized():
        # A process of a group: init_process_group's env:// (and DeepSpeed) read these.
        # A single process leaves the environment alone, so the jobs it launches see none.
        os.environ.update(env, LOCAL_RANK=device_local_rank(device, local_rank))
        # Before the rendezvous, where a wrong interface would hang: one line per node across nodes.
        prepare_gloo_interface(say=announce if local_rank == 0 and spans_nodes() else lambda line: None)
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        _control_group = torch_dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return Context(rank, world, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank if flag is true on any (a host-side collective)."""
    if not torch_dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX, group=_control_group)
    return bool(value.item())


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def bn_group(ranks: int, timeout_s: int):
    """The process group of the `ranks` consecutive ranks this one shares BN statistics with
    (None for 1). Collective: every rank makes every group, once per process, in the same order;
    on the device's backend (NCCL on GPU, gloo on the CPU), apart from DDP's default group."""
    if ranks == 1 or not torch_dist.is_initialized():
        return None
    if ranks not in _bn_groups:
        world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
        for start in range(0, world, ranks):
            group = torch_dist.new_group(list(range(start, start + ranks)),
                                         timeout=datetime.timedelta(seconds=timeout_s))
            if start <= rank < start + ranks:
                _bn_groups[ranks] = group
    return _bn_groups[ranks]


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier(group=_control_group)


def teardown() -> None:
    """After a run every rank finished: wait for all (host-side barrier: collective), then
    destroy the groups, so no rank exits, taking the rendezvous store with it, while a
    peer is still in its last collective (seen once as a rank aborting at exit under load)."""
    global _control_group
    if torch_dist.is_initialized():
        torch_dist.barrier(group=_control_group)
        torch_dist.destroy_process_group()
    _control_group = None
    _bn_groups.clear()
