"""Rules for the first multi-node GPU job that a CPU can check: frozen weights in bf16 under
bf16 autocast, DALI's threads from the task's CPUs, gloo's interface from the route to the
master, one rank listing ImageNet for all, the launcher's sample of headers, the DALI rate
without its prefetched batches."""
import pytest
import torch

from bnonly_dist import config, dist, network
from bnonly_dist.config import ConfigError, plan
from bnonly_dist.data import dali, layout, threads
from bnonly_dist.launch import preflight
from bnonly_dist.launch.cluster import Target
from bnonly_dist.models import memory

CPU = torch.device("cpu")


def cfg(*overrides):
    return config.load("configs/cifar10_resnet14.yaml", ["data.name=synthetic", "train.device=cpu", *overrides])


def test_frozen_weights_follow_bf16_autocast_unless_set_and_the_digest_stays_fp32():
    assert plan.resolve(cfg(), CPU, memory=memory).frozen_dtype is None  # fp32 autocast-free on the CPU by default
    auto16 = cfg("train.precision=bf16")
    assert plan.resolve(auto16, CPU, memory=memory).frozen_dtype == torch.bfloat16
    assert plan.resolve(cfg("train.precision=bf16", "train.frozen_dtype=fp32"), CPU, memory=memory).frozen_dtype is None
    net16, net32 = network.build(auto16, plan.resolve(auto16, CPU, memory=memory), 10), network.build(cfg(), plan.resolve(cfg(), CPU, memory=memory), 10)
    assert net16.model.conv1.weight.dtype == torch.bfloat16 and net16.frozen_sha == net32.frozen_sha
    assert "frozen weights bf16" in plan.resolve(auto16, CPU, memory=memory).describe()


@pytest.mark.parametrize("setting, env, cores, want", [
    (3, {"SLURM_CPUS_PER_TASK": "10"}, 16, 3),  # a number is kept
    # one CPU of the task stays with the training loop
    ("auto", {"SLURM_CPUS_PER_TASK": "6", "LOCAL_WORLD_SIZE": "8"}, 128, 5),  # Slurm says what the task has
    ("auto", {"LOCAL_WORLD_SIZE": "8"}, 128, 15),  # torchrun: the node's cores shared by its ranks
    ("auto", {"SLURM_NTASKS_PER_NODE": "4(x2)"}, 16, 3),
    ("auto", {}, 16, 15),
    ("auto", {"LOCAL_WORLD_SIZE": "8"}, 4, 1),
    ("auto", {"SLURM_CPUS_PER_TASK": "1"}, 16, 1),  # never none
])
def test_dali_threads_come_from_the_cpus_the_task_has(setting, env, cores, want):
    assert threads.dali_threads(setting, env, cores) == want


def test_num_threads_takes_auto_or_a_positive_count():
    imagenet = ["configs/imagenet_resnet18.yaml", ["data.root=/x"]]
    assert config.load(*imagenet).data.num_threads == "auto"
    assert config.load(imagenet[0], ["data.num_threads=2"]).data.num_threads == 2
    with pytest.raises(ConfigError, match="num_threads"):
        config.load(imagenet[0], ["data.num_threads=0"])


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
ib0\t0000010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t100\t000000FF\t0\t0\t0
down0\t0002010A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""


@pytest.mark.parametrize("address, interface", [("10.1.2.3", "ib0"), ("10.9.9.9", "eth0"), ("192.0.2.1", "eth0"),
                                                 ("127.0.0.1", "lo")])
def test_the_interface_is_the_longest_route_to_the_master(address, interface):
    assert dist.route_interface(address, ROUTES) == interface  # 10.1.2/24 via down0 is down: not taken


def test_gloo_interface_is_set_from_the_route_unless_the_user_set_one(tmp_path):
    routes = tmp_path / "route"
    routes.write_text(ROUTES)
    env = {"MASTER_ADDR": "10.1.0.7"}
    assert dist.prepare_gloo_interface(env, str(routes)) == "ib0" and env["GLOO_SOCKET_IFNAME"] == "ib0"
    mine = {"MASTER_ADDR": "10.1.0.7", "GLOO_SOCKET_IFNAME": "eth7"}
    assert dist.prepare_gloo_interface(mine, str(routes)) is None and mine["GLOO_SOCKET_IFNAME"] == "eth7"
    assert dist.prepare_gloo_interface({}, str(routes)) is None  # a single process: no master


def test_one_rank_lists_imagenet_and_the_others_get_its_listing(imagenet_root, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    sent = []
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: sent.append(obj) or obj)
    mine = dali.shared_index(str(imagenet_root), 0, 2)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: sent[0])  # rank 1 receives rank 0's verdict
    monkeypatch.setattr(dali, "imagenet_index", lambda *a, **k: pytest.fail("rank 1 listed the folders itself"))
    theirs = dali.shared_index(str(imagenet_root), 1, 2)
    assert theirs == mine == layout.imagenet_index(imagenet_root)


def test_a_bad_data_set_fails_on_every_rank_with_rank_0s_message(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: obj)
    with pytest.raises(layout.DataError, match="no class folders") as first:
        dali.shared_index(str(tmp_path), 0, 2)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: ("error", str(first.value)))
    with pytest.raises(layout.DataError, match="no class folders"):
        dali.shared_index(str(tmp_path), 1, 2)


def test_the_launcher_checks_a_sample_of_headers_and_says_so(imagenet_root, monkeypatch):
    monkeypatch.setattr(preflight, "HEADER_SAMPLE", 5)
    opened = []
    monkeypatch.setattr(layout, "bad_headers", lambda paths: opened.extend(paths) or [])
    cfg_in = config.load("configs/imagenet_resnet18.yaml", [f"data.root={imagenet_root}", "data.batch_size=8",
                                                                "train.bn_batch=8"])
    line = preflight.check_data(cfg_in, Target(slurm=False, nodes=1, tasks_per_node=1, gpus_per_node=0))
    assert len(opened) == 10 and "headers of 10 files checked (a sample" in line  # 5 train + 5 val of 52
    assert {p.split("/")[-2] for p in opened} == {p.name for p in (imagenet_root / "train").iterdir()}  # every class


def test_the_pipeline_rate_does_not_count_the_prefetched_batches(source_of):
    from bnonly_dist.perf import bench
    source_of(100)
    rate = bench.pipeline_rate(cfg(), CPU, steps=7, warmup=2)
    assert rate["batches"] == 5 and rate["not_counted"] == 2 and rate["batch"] == cfg().data.batch_size
    with pytest.raises(ConfigError, match="prefetch"):
        bench.pipeline_rate(cfg(), CPU, steps=2, warmup=2)


def test_the_launcher_says_dalis_threads_and_the_cpus_they_come_from(imagenet_root):
    cfg = config.load("configs/imagenet_resnet18.yaml", [f"data.root={imagenet_root}", "data.batch_size=32",
                                                          "train.bn_batch=32", "train.device=cpu"])
    line = preflight.dali_line(cfg, Target(True, 2, 8, 8, cpus_per_task=16))
    assert line == ("DALI: 15 CPU threads per rank (the task's CPUs minus one, which the training loop keeps); "
                    "16 CPUs per task")
    cfg = config.load("configs/imagenet_resnet18.yaml", [f"data.root={imagenet_root}", "data.num_threads=3"])
    assert preflight.dali_line(cfg, Target(True, 1, 8, 8, cpus_per_task=12)).startswith(
        "DALI: 3 CPU threads per rank (data.num_threads); 12 CPUs per task")
