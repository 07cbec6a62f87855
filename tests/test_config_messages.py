"""Refusals a user can act on: a config error names its file, line and the nearest key; a run directory
names every key that differs, the important ones first, and the fix; numbers read as Python writes them."""
from __future__ import annotations

import subprocess

import pytest

from bnonly_dist import cli, config
from bnonly_dist.config import ConfigError
from bnonly_dist.models import memory
from bnonly_dist.run import rundir

REPO_CONFIGS = config.loading.CONFIGS


def _copy_of_demo(folder, *extra_lines):
    """configs/demo.yaml copied elsewhere (its relative base: then points nowhere), plus lines."""
    text = (REPO_CONFIGS / "demo.yaml").read_text()
    path = folder / "mine.yaml"
    path.write_text(text + "".join(line + "\n" for line in extra_lines))
    return path


def test_a_copied_config_names_its_base_key_and_where_it_was_resolved(tmp_path):
    path = _copy_of_demo(tmp_path)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("base:"))
    assert f"{path} line {line}: base: base/cifar10.yaml resolves to {tmp_path / 'base' / 'cifar10.yaml'}" in str(err.value)
    assert f"base: {REPO_CONFIGS / 'base' / 'cifar10.yaml'}" in str(err.value)  # the fix that works


def test_an_unknown_key_in_a_file_names_the_file_its_line_and_the_nearest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"base: {REPO_CONFIGS / 'demo.yaml'}\ntrain:\n  log_every: 5\n  checkpont_every: 7\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"unknown config key 'train.checkpont_every' in {path} line 4; "
                                     "did you mean 'train.checkpoint_every'?")
    path.write_text(f"base: {REPO_CONFIGS / 'demo.yaml'}\ntrain:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=f"config key 'train.max_steps' in {path} line 3: .*'many'"):
        config.load(path)
    # the same key set again as an override: the override is what failed, not the file
    with pytest.raises(ConfigError, match=r"config key 'train.max_steps': .*'few'\); fix it in the YAML"):
        config.load(path, ["train.max_steps=few"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        config.load("configs/demo.yaml", ["optim.lrr=0.1"])


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  arch: cifar_resnet_20\noptim:\n  milestones: [8, 10\n")
    with pytest.raises(ConfigError, match=f"{path} line 5: not valid YAML"):
        config.load(path)


@pytest.mark.parametrize("written, value", [("1e30", 1e30), ("5E-4", 5e-4), ("-2.5e+3", -2500.0), ("1.0", 1.0)])
def test_numbers_read_as_python_writes_them(tmp_path, written, value):
    assert config.parse_override(f"optim.weight_decay={written}")[1] == value
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {REPO_CONFIGS / 'demo.yaml'}\noptim:\n  weight_decay: {written}\n")
    if value >= 0:
        assert config.load(path).optim.weight_decay == value
    assert config.load("configs/demo.yaml", [f"optim.lr={written.lstrip('-')}"]).optim.lr == abs(value)
    assert config.parse_override("name=e30")[1] == "e30"  # not a number: a string as before


def _taken(tmp_path, *overrides):
    cfg = config.load("configs/demo.yaml", [f"runs_root={tmp_path}", *overrides])
    rundir.prepare(cfg, tmp_path / cfg.run_name())
    return tmp_path / cfg.run_name()


def test_a_run_dir_refusal_names_every_differing_key_most_important_first(tmp_path):
    taken = _taken(tmp_path)
    other = config.load("configs/demo.yaml", [f"runs_root={tmp_path}", "seed=1", "mode=bn_output", "optim.lr=0.2"])
    with pytest.raises(ConfigError) as err:
        rundir.check(other, taken)
    message = str(err.value)
    assert f"{taken} holds a run with mode=bn, not bn_output; seed=0, not 1; optim.lr=0.1, not 0.2 (from" in message
    assert "pass name=NEW_NAME (or --run-dir DIR)" in message  # the demo's name: is fixed
    deeper = config.load("configs/cifar10_resnet56.yaml", [f"data.root={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        rundir.check(deeper, taken)
    message = str(err.value)
    assert message.index("model.arch=cifar_resnet_20, not cifar_resnet_56") < message.index("data.eval_batch_size")
    assert "pass --run-dir DIR (or name=NEW_NAME)" in message  # a derived name: --run-dir first


def test_a_bn_batch_difference_is_written_as_yaml(tmp_path):
    taken = _taken(tmp_path)
    with pytest.raises(ConfigError, match="train.bn_batch=128, not null"):
        rundir.check(config.load("configs/demo.yaml", [f"runs_root={tmp_path}", "train.bn_batch=null"]), taken)


def test_config_and_run_dir_check_the_bn_grouping_for_a_world_size(capsys):
    assert cli.main(["config", "configs/demo.yaml", "--world", "4"]) == 0
    assert "on 4 ranks: 32 images per rank; BN statistics over 128 images: synchronised over 4 ranks" in capsys.readouterr().out
    assert cli.main(["run-dir", "configs/demo.yaml", "train.bn_batch=48", "--world", "4"]) == 2
    assert "train.bn_batch=48 cannot be formed" in capsys.readouterr().err
    assert cli.main(["run-dir", "configs/demo.yaml", "--world", "3"]) == 2
    assert "must divide by the world size 3" in capsys.readouterr().err
    assert cli.main(["run-dir", "configs/demo.yaml", "--world", "2"]) == 0


def test_every_command_and_option_has_a_description():
    parser = cli.parser()
    commands = parser._subparsers._group_actions[0].choices
    data = commands["data"]._subparsers._group_actions[0].choices
    for name, sub in [*commands.items(), *(("data " + n, p) for n, p in data.items())]:
        assert sub.description, f"bnonly {name} --help has no description"
        for action in sub._actions:
            if action.dest not in ("help", "data_command"):
                assert action.help, f"bnonly {name}: {action.option_strings or action.dest} has no help"


def test_make_test_passes_its_arguments_to_pytest():
    out = subprocess.run(["make", "-n", "test", "ARGS=tests/test_config.py -k override"], capture_output=True,
                         text=True, cwd=REPO_CONFIGS.parent)
    assert out.returncode == 0 and "pytest -q tests/test_config.py -k override" in out.stdout


@pytest.mark.parametrize("bn_batch, same_statistics", [("128", True), ("null", False)])
def test_a_resume_on_another_world_says_one_thing_about_bn_statistics(bn_batch, same_statistics):
    import logging

    import torch

    from bnonly_dist.config.plan import resolve
    from bnonly_dist.run.train import reshard_lines
    cfg = config.load("configs/demo.yaml", [f"train.bn_batch={bn_batch}"])
    lines = reshard_lines(resolve(cfg, torch.device("cpu"), 2, memory=memory), 128, 1, 2)
    text = " ".join(line for _, line in lines)
    assert ("the same BN statistics" in text) == same_statistics
    assert ("BN statistics now come from 64 images per rank instead of 128" in text) == (not same_statistics)
    assert [level for level, _ in lines] == [logging.INFO] + ([] if same_statistics else [logging.WARNING])
