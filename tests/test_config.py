import subprocess
import sys

import pytest
import yaml

from bnonly_dist import config
from bnonly_dist.config import ConfigError


def test_every_shipped_config_loads():
    from pathlib import Path
    for path in sorted(Path("configs").glob("*.yaml")):
        cfg = config.load(path)
        assert cfg.mode == "bn", path


def test_required_keys_exist_and_overrides_apply():
    cfg = config.load("configs/imagenet_resnet200.yaml", [
        "optim.lr=0.2", "data.root=/data/imagenet", "mode=all", "seed=3", "data.batch_size=512",
        "optim.epochs=10", "train.max_steps=7", "optim.milestones=[3,6]"])
    assert (cfg.optim.lr, cfg.data.root, cfg.mode, cfg.seed) == (0.2, "/data/imagenet", "all", 3)
    assert (cfg.model.arch, cfg.data.batch_size, cfg.optim.epochs, cfg.train.max_steps) == ("imagenet_resnet_200", 512, 10, 7)
    assert cfg.optim.milestones == [3, 6]
    assert cfg.optim.warmup_epochs == 5  # from the ImageNet base


def test_paper_recipes_are_the_defaults():
    cifar = config.load("configs/cifar10_resnet110.yaml")
    assert (cifar.optim.lr, cifar.data.batch_size, cifar.optim.epochs, cifar.optim.milestones) == (0.1, 128, 160, [80, 120])
    imagenet = config.load("configs/imagenet_resnet50.yaml")
    assert (imagenet.optim.lr, imagenet.data.batch_size, imagenet.optim.epochs) == (0.4, 1024, 90)
    assert imagenet.optim.milestones == [30, 60, 80] and imagenet.optim.warmup_epochs == 5


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("optim.lr=-1", "'optim.lr'"),
    ("optim.lr=fast", "'optim.lr'"),
    ("data.batch_size=12.5", "'data.batch_size'"),
    ("train.compile=3", "'train.compile'"),
    ("model.arch=cifar_resnet_15", "6n+2"),
    ("model.arch=imagenet_resnet_77", "imagenet_resnet_77"),
    ("mode=bn_only", "'mode'"),
    ("optim.milestones=[120,80]", "increasing"),
    ("nodots", "key=value"),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        config.load("configs/cifar10_resnet14.yaml", [override])
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_key_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "train", "configs/demo.yaml", "optim.bogus=1",
                           "--run-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "optim.bogus" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = config.load("configs/cifar10_wrn14_4.yaml", ["optim.lr=0.05"])
    config.save(cfg, tmp_path / "config.yaml")
    assert config.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


def test_run_name_ignores_pacing_keys():
    a = config.load("configs/cifar10_resnet14.yaml", ["train.max_steps=5"])
    b = config.load("configs/cifar10_resnet14.yaml", ["train.log_every=7"])
    c = config.load("configs/cifar10_resnet14.yaml", ["optim.lr=0.2"])
    assert a.run_name() == b.run_name() != c.run_name()
