"""The README's ImageNet trial: its overrides fit `bnonly data fake-imagenet`'s default set, which the config alone does not."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bnonly_dist import cli, config
from bnonly_dist.launch import preflight
from bnonly_dist.launch.cluster import Target

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_trial_overrides_fit_the_default_fake_imagenet(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("#### Trying an ImageNet config"):]
    make, train = re.findall(r"^bnonly (data fake-imagenet .+|train configs/imagenet.+)$", section, re.M)[:2]
    data_dir = tmp_path / "fake-in"
    assert cli.main([*shlex.split(make)[:-1], str(data_dir)]) == 0  # the defaults of `bnonly data fake-imagenet`
    words = shlex.split(train)[1:]
    overrides = [w if not w.startswith("data.root=") else f"data.root={data_dir}" for w in words[1:]]
    cpu = Target(slurm=False, nodes=1, tasks_per_node=1, gpus_per_node=0)
    cfg = config.load(REPO / words[0], overrides)
    assert "320 train / 100 val images" in preflight.check_data(cfg, slurm=False)
    preflight.check_run(cfg, tmp_path / "run", cpu, preview_run_dir=True)
    bare = config.load(REPO / words[0], [f"data.root={data_dir}"])
    with pytest.raises(config.ConfigError, match="data.batch_size=1024 exceeds the 320 training images"):
        preflight.check_data(bare, slurm=False)
