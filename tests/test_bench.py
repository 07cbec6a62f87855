import json
import subprocess
import sys


def test_bench_reports_all_plain_and_lean_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "bench", "configs/cifar10_resnet14.yaml",
                           "data.batch_size=16", "train.device=cpu", "--steps", "2", "--warmup", "1",
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
                           "data.batch_size=8", "data.image_size=64", "train.device=cpu", f"data.root={imagenet_root}",
                           "--variants", "bn-lean", "--steps", "2", "--warmup", "1", "--data", "--json",
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
