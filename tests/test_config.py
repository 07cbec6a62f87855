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
        "optim.lr=0.2", "data.root=/data/imagenet", "mode=all", "seed=3", "data.batch_size=512", "train.bn_batch=512",
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


def test_docs_config_md_is_generated_from_the_schema():
    from bnonly_dist.config import reference as config_reference
    with open("docs/config.md") as f:
        assert f.read() == config_reference.generate_markdown(), \
            "docs/config.md is stale: python -m bnonly_dist.config.reference > docs/config.md"
    names = [k.name for k in config_reference.keys()]
    assert "optim.lr" in names and "data.image_size" in names and len(names) == len(set(names))
    assert all(k.description for k in config_reference.keys())  # every key documented


def test_bnonly_config_shows_value_source_and_meaning():
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "config", "configs/cifar10_resnet56.yaml",
                           "optim.lr=0.2"], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert "optim.lr = 0.2    [override; default 0.1]" in lines
    assert "model.arch = cifar_resnet_56    [file configs/cifar10_resnet56.yaml; default cifar_resnet_20]" in lines
    assert "optim.epochs = 160    [base configs/base/cifar10.yaml; default 160]" in lines
    assert "train.lean_autograd = auto    [default]" in lines
    assert not any(line.startswith("data.image_size") for line in lines)  # an ImageNet key
    keys = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "config", "--keys"], capture_output=True,
                          text=True, check=True).stdout
    assert len(keys.splitlines()) == len(config.Config.model_fields) - 5 + sum(
        len(s.annotation.model_fields) for n, s in config.Config.model_fields.items()
        if n in ("model", "data", "optim", "train", "dist"))


def test_saved_config_holds_only_keys_of_its_data_set(tmp_path):
    cifar = config.load("configs/cifar10_resnet20.yaml")
    config.save(cifar, tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert set(saved["data"]) == {"name", "root", "batch_size", "eval_batch_size"}
    assert config.from_dict(saved).run_name() == cifar.run_name()  # same identity, same derived name
    imagenet = config.load("configs/imagenet_resnet50.yaml")
    config.save(imagenet, tmp_path / "i.yaml")
    assert "image_size" in yaml.safe_load((tmp_path / "i.yaml").read_text())["data"]


@pytest.mark.parametrize("override, words", [
    ("optim.lr=.inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.momentum=.nan", "optim.momentum"),
    ("seed=-1", "seed"), ("data.min_area=.nan", "data.min_area"),
])
def test_non_finite_floats_and_negative_seeds_are_refused(override, words):
    with pytest.raises(ConfigError, match=words):
        config.load("configs/demo.yaml", [override])


def test_a_config_file_that_is_not_utf8_gets_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("mode: bn  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        config.load(bad)
    assert "\n" not in str(err.value)
