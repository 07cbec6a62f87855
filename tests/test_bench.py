import json
import subprocess
import sys
import weakref

import pytest
import torch

from bnonly_dist import config
from bnonly_dist.perf import bench, bench_runner


def test_bench_reports_all_plain_and_lean_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "bench", "configs/cifar10_resnet14.yaml",
                           "data.batch_size=16", "train.bn_batch=16", "train.device=cpu", "--steps", "2", "--warmup", "1",
                           "--json", str(out)], capture_output=True, text=True, check=True)
    report = json.loads(out.read_text())
    by_variant = {r["variant"]: r for r in report["results"]}
    assert list(by_variant) == ["all", "bn-plain", "bn-lean"]
    assert by_variant["all"]["trainable_params"] == 175_258
    assert by_variant["bn-plain"]["trainable_params"] == by_variant["bn-lean"]["trainable_params"] == 1_120
    for result in by_variant.values():
        assert result["images_per_s"] == 16 / result["step_time_s"] > 0
        assert result["saved_activation_bytes"] > 16 * 3 * 32 * 32 * 4  # at least the input batch
        assert result["saved_activation_bytes_per_image"] == result["saved_activation_bytes"] / 16
        assert result["flops_per_step"] > 0 and result["max_batch"] is None  # no GPU: no batch search
    # Frozen convolutions need no weight gradients (no weight-gradient FLOPs) or momentum.
    assert by_variant["bn-plain"]["grad_and_momentum_bytes"] == 2 * 4 * 1_120
    assert by_variant["bn-plain"]["flops_per_step"] < 0.75 * by_variant["all"]["flops_per_step"]
    ratio = report["over_all"]
    assert ratio["bn-lean"]["saved_activation_bytes"] < 0.6 < ratio["bn-plain"]["saved_activation_bytes"]
    assert "bn-lean/all" in proc.stdout and "img/s" in proc.stdout


def test_bench_times_the_data_pipeline_alone(tmp_path, imagenet_root):
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "bench", "configs/imagenet_resnet18.yaml",
                           "data.batch_size=4", "train.bn_batch=4", "data.image_size=64", "train.device=cpu",
                           f"data.root={imagenet_root}",  # 32 images: 8 batches, more than the 2 prefetched + 3 timed
                           "--variants", "bn-lean", "--steps", "3", "--warmup", "1", "--data", "--json",
                           str(tmp_path / "b.json")], capture_output=True, text=True, check=True)
    report = json.loads((tmp_path / "b.json").read_text())
    pipe = report["data_pipeline"]
    assert pipe["source"] == "imagenet" and pipe["decode"] == "cpu" and pipe["images_per_s"] > 0
    assert [r["variant"] for r in report["results"]] == ["bn-lean"]
    assert "data pipeline alone (imagenet, cpu decode" in proc.stdout and "bounds a step" in proc.stdout


def test_bench_rejects_an_unknown_variant():
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "bench", "configs/cifar10_resnet14.yaml",
                           "--variants", "bn-fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown variant bn-fast" in proc.stderr


def test_bench_checkpoint_measures_both_layouts(tmp_path):
    out = tmp_path / "ckpt.json"
    subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "bench-checkpoint", "configs/cifar10_resnet14.yaml",
                    "train.device=cpu", "--dir", str(tmp_path / "w"), "--repeats", "1", "--json", str(out)],
                   capture_output=True, text=True, check=True)
    report = json.loads(out.read_text())
    lean, full = report["results"]
    assert not lean["frozen_included"] and full["frozen_included"]
    # The frozen weights are 175,258 - 1,120 fp32 numbers; the BN-only state is far smaller.
    assert full["bytes"] - lean["bytes"] > 4 * (175_258 - 1_120) and lean["bytes"] < full["bytes"] / 3
    assert lean["save_s"] > 0 and lean["load_s"] > 0 and not list((tmp_path / "w").iterdir())


def cfg(*overrides):
    return config.load("configs/cifar10_resnet14.yaml", ["train.device=cpu", *overrides])


def test_a_variant_slowed_on_purpose_is_reported_slower_with_spreads(monkeypatch):
    """The variants step in turns in their own processes; one sleeps 3 s inside its timed step
    (far above a step of this tiny net, even on a loaded machine)."""
    monkeypatch.setenv(bench_runner.DELAY_ENV, "bn-plain=3")
    lines = []
    report = bench.run(cfg("data.batch_size=4", "train.bn_batch=4", "train.channels_last=true",
                           "train.lean_autograd=false"), steps=3, warmup=1, variants=["all", "bn-plain", "naive"],
                       echo=lines.append)
    by_variant = {r["variant"]: r for r in report["results"]}
    slowed = report["ratios"]["bn-plain"]
    for base in ["all", "naive"]:
        ratio = slowed[base]
        assert ratio["q1"] <= ratio["step_time"] <= ratio["q3"] and ratio["q1"] > 1 and ratio["distinguishable"]
    assert by_variant["bn-plain"]["step_time"]["min"] > 3 and report["ratios"]["naive"]["bn-plain"]["step_time"] < 1
    assert len(by_variant["all"]["step_times_s"]) == 3  # the warm-up round is not timed
    # The config's keys reach the variants: train's default here is bn-plain (lean off), NHWC,
    # except for naive, which is what a user writes by hand (NCHW).
    assert report["default"] == "bn-plain" and not by_variant["bn-plain"]["lean"]
    assert by_variant["bn-plain"]["channels_last"] and not by_variant["naive"]["channels_last"]
    # Streamed: the header first, then each variant's line, then the ratios.
    assert lines[0].startswith("cifar_resnet_14 batch 4") and "variants in turn" in lines[0]
    assert [line.split(",")[0] for line in lines[2:6]] == ["round 1/4 (warm-up)", "round 2/4", "round 3/4", "round 4/4"]
    assert [line.split()[0] for line in lines[6:9]] == ["all", "bn-plain", "naive"]
    assert any(line.startswith("bn-plain/all: step time") and "(IQR " in line for line in lines[9:])


def test_ratios_pair_steps_of_the_same_round():
    def result(variant, times):
        return {"variant": variant, "step_times_s": times, "saved_activation_bytes": 100}
    # The machine slows down 4x over the rounds; b stays 2x slower than all in every round.
    ratios = bench.ratios([result("all", [1.0, 2.0, 4.0]), result("b", [2.0, 4.0, 8.0]),
                           result("c", [0.9, 2.2, 4.0])])
    assert ratios["b"]["all"]["step_time"] == 2.0 and ratios["b"]["all"]["distinguishable"]
    assert ratios["c"]["all"]["q1"] < 1 < ratios["c"]["all"]["q3"] and not ratios["c"]["all"]["distinguishable"]


@pytest.mark.parametrize("overrides, args, message", [
    ([], ["--steps", "0"], "--steps 0 --warmup 3: need at least 1 timed step"),
    ([], ["--steps", "-2"], "--steps -2 --warmup 3: need at least 1 timed step"),
    (["dist.engine=fsdp"], [], "dist.engine=fsdp: bench times one process"),
    (["mode=all"], [], "mode=all: the BN-only variants run the config's mode"),
])
def test_bench_refuses_what_it_cannot_run_in_one_line(overrides, args, message):
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "bench", "configs/cifar10_resnet14.yaml",
                           *overrides, *args], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_largest_batch_counts_library_allocation_failures_as_not_fitting():
    freed = []

    def step(size):
        if freed:
            assert freed[-1]() is None  # the failed try's tensors are gone before the next one
        if size > 200:
            held = torch.empty(1000)
            freed.append(weakref.ref(held))
            if size > 400:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    assert bench_runner.largest_batch(step, 32, 4096) == 200
    assert freed and freed[-1]() is None
    assert bench_runner.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert bench_runner.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate: out of memory"))

    def broken(size):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bench_runner.largest_batch(broken, 32, 4096)


def test_peak_bf16_figures_by_device_name():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0 and bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA A10") == 125.0 and bench.peak_tflops("Tesla T4") is None


def test_a_variant_sets_cudnn_benchmark_as_training_does():
    before = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in [False, True]:
            runner = bench_runner.Runner(cfg(f"train.deterministic={str(deterministic).lower()}"), "bn-lean", 2)
            assert torch.backends.cudnn.benchmark is not deterministic
            assert torch.are_deterministic_algorithms_enabled() is deterministic
            assert runner.plan.lean and runner.step() > 0
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1])
