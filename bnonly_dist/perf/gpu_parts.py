"""The parts of the GPU check, in the order of their value, each with its own time limit.

The limits add up to PARTS_S, which leaves MARGIN_S of the 8-minute budget for starting
Python, the environment probe and the report. Each limit is an estimate for one H200 from
what the parts do (docs/gpu.md has the table and the reasoning); a part that outlives its
limit is stopped with its whole process group and reported "timed out" with what it
printed so far, and the next part runs.

`--rehearse` runs the same parts with the same orchestration on the CPU at tiny sizes
(CIFAR ResNet-14 instead of the ImageNet ResNets, a few steps, a few small JPEGs, `cpu`
decode in place of `mixed`); the cuda tests run with the CPU as their device
(BNONLY_TEST_DEVICE=cpu) and tiny sizes, so that an assertion which needs no GPU fails in
CI rather than on the GPU node.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

BUDGET_S = 480  # the whole check on one node, installation included
INSTALL_LIMIT_S = 60  # pip, offline, of the ~265 MiB wheel folder (DALI's set dominates)
REHEARSAL_SCALE = 3  # --rehearse: every limit (and the budget) times this, for a loaded 2-core CI machine
MARGIN_S = 30  # Python start-up, the environment probe, the report; and slack for the estimates
ESSENTIAL = ("cuda-tests", "bench-imagenet-resnet50", "dali-mixed")  # the exit code says whether these passed
NEEDED = ("pydantic", "submitit", "deepspeed", "nvidia.dali", "pytest")  # modules a GPU node may lack
TEST_DEVICE_ENV = "BNONLY_TEST_DEVICE"  # tests/test_gpu.py runs on this device (default cuda)
# The cuda tests the check runs (pytest node ids or files): edit this list to add or drop one.
# tests/test_gpu.py holds the ZeRO-1 bf16 frozen-weights test (test_deepspeed_single_gpu_computes_in_bf16).
# An id not in the checkout is left out and named in the cuda-tests part's detail (pytest would run nothing).
CUDA_TESTS = (
    "tests/test_gpu.py",
    "tests/test_bn_groups.py::test_on_the_gpu_ghost_groups_equal_native_batchnorm_per_group",
    "tests/test_bn_groups.py::test_on_the_gpu_a_synchronised_group_of_one_rank_equals_native_batchnorm",
)
# Plugins a node's Python happens to have (pytest-timeout, xdist, ...) stay out of the run.
PYTEST_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
DALI_WARMUP, DALI_TIMED = 3, 12  # batches of the DALI rate: one epoch must hold warm-up + timed + 1
DALI_RATE = f"""
import json, os, sys, torch
from bnonly_dist import config
from bnonly_dist.perf import bench
cfg = config.load(sys.argv[1], sys.argv[2:])
device = torch.device(cfg.train.device, 0) if cfg.train.device == "cuda" else torch.device("cpu")
rate = bench.pipeline_rate(cfg, device, steps={DALI_TIMED}, warmup={DALI_WARMUP})
print("RESULT " + json.dumps(rate), flush=True)
if "skipped" in rate:
    print("DALI rate refused: " + rate["skipped"], flush=True)
os._exit(1 if "skipped" in rate else 0)  # not DALI's teardown of threads and pipelines: it took seconds
"""
# Photo-like JPEGs take tens of milliseconds each to write: a few per class are written, the rest of an
# epoch are hard links to them (the same bytes to decode, no time to write).
FAKE_IMAGENET = """
import os, sys
from pathlib import Path
from bnonly_dist.data import fake
root, classes, distinct, per_class, low, high = sys.argv[1], *map(int, sys.argv[2:])
fake.write_imagenet(root, classes, distinct, 1, 0, (low, high), photo_like=True)
for folder in sorted(Path(root, "train").iterdir()):
    written = sorted(folder.iterdir())
    for i in range(distinct, per_class):
        os.link(written[i % distinct], folder / f"{folder.name}_train_{i:05d}.JPEG")
print(f"{classes * distinct} distinct JPEGs, {classes * per_class} training files in all", flush=True)
"""


@dataclass
class Part:
    name: str
    limit_s: float
    cmd: list[str]
    needs: tuple[str, ...] = ()  # what must be there: "gpu", "config" (pydantic), "dali", "pytest", "data"
    env: dict = field(default_factory=dict)
    json: Path | None = None  # the bench's JSON report, when the part writes one
    note: str = ""  # a line for the report beside the part's own outcome

    @property
    def essential(self) -> bool:
        return self.name in ESSENTIAL


def dali_threads_for_one_rank(gpus: int) -> int:
    """DALI threads of one rank on this node: the task's CPUs (the rule the training run
    uses, data.num_threads=auto), with one rank per GPU when no launcher says otherwise."""
    from bnonly_dist.data.threads import dali_threads
    return dali_threads("auto", {**os.environ, "LOCAL_WORLD_SIZE": os.environ.get("LOCAL_WORLD_SIZE", str(max(1, gpus)))})


def present(test: str, repo: Path) -> bool:
    """Whether a pytest file or node id (file::function) is in the checkout."""
    path, _, function = test.partition("::")
    file = repo / path
    return file.is_file() and (not function or f"def {function.split('[')[0]}(" in file.read_text())


def fake_imagenet_size(batch: int, classes: int) -> int:
    """Training images per class for an epoch of warm-up + timed + 2 batches (one more than the rate needs)."""
    return -(-(DALI_WARMUP + DALI_TIMED + 2) * batch // classes)


def parts(out: Path, scratch: Path, rehearse: bool, gpus: int, select_tests: str | None = None,
          repo: Path = Path(__file__).resolve().parents[2]) -> list[Part]:
    """The check's parts, most valuable first; limits in seconds (the GPU's; the same in a rehearsal).
    What a person reads goes to out (the bench JSONs, cuda-tests.xml); the JPEGs to scratch."""
    py = sys.executable
    cli = [py, "-m", "bnonly_dist.cli"]
    device = "cpu" if rehearse else "cuda"
    if rehearse:  # tiny: CIFAR ResNet-14 on synthetic 32 px images stands in for every network
        rn50 = rn200 = ["configs/cifar10_resnet14.yaml", "data.name=synthetic", "data.batch_size=8", "train.bn_batch=8"]
        steps, max_limit = ["--steps", "2", "--warmup", "1"], "32"
        classes, distinct, sides, dali_batch, mixed = 2, 20, (64, 96), 8, "cpu"
    else:
        # BN over each step's whole batch: the network's speed (what groups cost: perf/bench_bn.py)
        rn50 = ["configs/imagenet_resnet50.yaml", "data.batch_size=256", "train.bn_batch=256"]
        rn200 = ["configs/imagenet_resnet50.yaml", "model.arch=imagenet_resnet_200", "data.batch_size=128",
                 "train.bn_batch=128"]
        steps, max_limit = ["--steps", "10", "--warmup", "3"], "4096"
        classes, distinct, sides, dali_batch, mixed = 8, 24, (333, 500), 128, "mixed"
    precision = ["train.precision=bf16", "train.channels_last=true", f"train.device={device}"]
    data = scratch / "fake-imagenet"
    data_args = [str(classes), str(distinct), str(fake_imagenet_size(dali_batch, classes)), *map(str, sides)]
    threads = str(2 if rehearse else dali_threads_for_one_rank(gpus))
    dali = ["configs/imagenet_resnet50.yaml", f"data.root={data}", f"data.batch_size={dali_batch}",
            f"train.bn_batch={dali_batch}",
            f"data.num_threads={threads}", f"train.device={device}"]
    missing = [t for t in CUDA_TESTS if not present(t, repo)]
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
             *(t for t in CUDA_TESTS if t not in missing), f"--junitxml={out / 'cuda-tests.xml'}",
             *(["-k", select_tests] if select_tests else [])]

    def bench(name: str, limit_s: float, conf: list[str], variants: str, extra: list[str]) -> Part:
        path = out / f"{name}.json"
        return Part(name, limit_s, [*cli, "bench", *conf, *precision, "--variants", variants, *extra, "--json", str(path)],
                    ("gpu", "config"), json=path)

    listed = [
        Part("cuda-tests", 120, tests, ("config", "pytest"),
             env={**PYTEST_ENV, **({TEST_DEVICE_ENV: device} if rehearse else {})},
             note=f"not in this checkout, left out (gpu_parts.CUDA_TESTS): {', '.join(missing)}" if missing else ""),
        bench("bench-imagenet-resnet50", 90, rn50, "all,naive,bn-plain,bn-lean", [*steps, "--max-batch-limit", "0"]),
        Part("dali-data", 30, [py, "-c", FAKE_IMAGENET, str(data), *data_args], ("gpu", "config", "dali")),
        Part("dali-mixed", 30, [py, "-c", DALI_RATE, *dali, f"data.decode={mixed}"], ("gpu", "config", "dali", "data")),
        bench("bench-imagenet-resnet200", 50, rn200, "all,bn-lean", [*steps, "--max-batch-limit", "0"]),
        Part("dali-cpu", 20, [py, "-c", DALI_RATE, *dali, "data.decode=cpu"], ("gpu", "config", "dali", "data")),
        bench("bench-imagenet-resnet50-max-batch", 50, rn50, "all,bn-lean", ["--max-batch-only", "--max-batch-limit", max_limit]),
    ]
    return listed
