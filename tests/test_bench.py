import json
import subprocess
import sys


def test_bench_reports_all_and_bn_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "bench", "configs/cifar10_resnet14.yaml",
                           "data.batch_size=16", "train.device=cpu", "--steps", "2", "--warmup", "1",
                           "--json", str(out)], capture_output=True, text=True, check=True)
    report = json.loads(out.read_text())
    by_mode = {r["mode"]: r for r in report["results"]}
    assert set(by_mode) == {"all", "bn"}
    assert by_mode["all"]["trainable_params"] == 175_258 and by_mode["bn"]["trainable_params"] == 1_120
    for result in by_mode.values():
        assert result["images_per_s"] == 16 / result["step_time_s"] > 0
        assert result["saved_activation_bytes"] > 16 * 3 * 32 * 32 * 4  # at least the input batch
    # Frozen convolutions need no weight gradients or momentum.
    assert by_mode["bn"]["grad_and_momentum_bytes"] == 2 * 4 * 1_120
    ratio = report["bn_over_all"]
    assert ratio["step_time"] == by_mode["bn"]["step_time_s"] / by_mode["all"]["step_time_s"]
    assert "bn/all" in proc.stdout and "img/s" in proc.stdout


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
