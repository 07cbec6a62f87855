"""Generated data sets never overwrite a data set, hints never point a generator at the user's data,
and a CIFAR-10 folder with a file missing or in the wrong shape names that file."""
from __future__ import annotations

import shutil

import pytest
import torch

from bnonly_dist import cli, config
from bnonly_dist.config.plan import resolve
from bnonly_dist.data import describe, layout
from bnonly_dist.models import memory

SMALL = ["--train-size", "50", "--test-size", "20"]


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_cifar_generator_refuses_other_data_and_recognises_its_own(tmp_path, capsys):
    root = tmp_path / "c10"
    assert cli.main(["data", "fake-cifar10", str(root), *SMALL]) == 0
    before = _files(root)
    capsys.readouterr()
    assert cli.main(["data", "fake-cifar10", str(root), *SMALL]) == 0  # make demo twice: the same data set
    assert "already holds this data set" in capsys.readouterr().out and _files(root) == before
    assert cli.main(["data", "fake-cifar10", str(root), *SMALL, "--seed", "1"]) == 2  # another data set: refused
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds CIFAR-10 files" in err and "--force" in err
    assert _files(root) == before
    assert cli.main(["data", "fake-cifar10", str(root), *SMALL, "--seed", "1", "--force"]) == 0
    after = _files(root)
    assert after.keys() == before.keys() and after != before


def test_the_imagenet_generator_never_writes_into_a_real_imagenet(tmp_path, capsys):
    real = tmp_path / "imagenet" / "train" / "n01440764"
    real.mkdir(parents=True)
    (real / "n01440764_1.JPEG").write_bytes(b"a photograph")
    for force in ([], ["--force"]):
        assert cli.main(["data", "fake-imagenet", str(tmp_path / "imagenet"), "--classes", "2", *force]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "n01440764/ is not a class folder of this generator" in err
    assert [p.name for p in (tmp_path / "imagenet").rglob("*")] == ["train", "n01440764", "n01440764_1.JPEG"]
    fake = ["data", "fake-imagenet", str(tmp_path / "fake"), "--classes", "2", "--train-per-class", "2",
            "--val-per-class", "1", "--min-side", "8", "--max-side", "12"]
    assert cli.main(fake) == 0
    assert cli.main(fake) == 0 and "already holds this data set" in capsys.readouterr().out
    assert cli.main([*fake[:-1], "13"]) == 2 and "--force" in capsys.readouterr().err
    assert cli.main([*fake[:-1], "13", "--force"]) == 0
    smaller = [*fake, "--train-per-class", "1", "--classes", "1"]  # --force replaces the earlier set wholly
    assert cli.main([*smaller, "--force"]) == 0
    assert sorted(p.relative_to(tmp_path / "fake").as_posix() for p in (tmp_path / "fake").rglob("*.JPEG")) == [
        "train/n10000000/n10000000_train_00000.JPEG", "val/n10000000/n10000000_val_00000.JPEG"]
    (tmp_path / "fake" / "val" / "n10000000" / "notes.txt").write_text("mine")
    assert cli.main([*fake, "--force"]) == 2 and "files this generator does not make" in capsys.readouterr().err
    assert (tmp_path / "fake" / "val" / "n10000000" / "notes.txt").read_text() == "mine"


def test_a_missing_data_set_hint_points_the_generator_at_a_scratch_folder(tmp_path):
    with pytest.raises(layout.DataError) as err:
        layout.cifar10_dir(tmp_path / "cifar10")
    assert f"fake-cifar10 {tmp_path / 'cifar10'}" not in str(err.value)
    assert f"`bnonly data fake-cifar10 {layout.SCRATCH_CIFAR}` and data.root={layout.SCRATCH_CIFAR}" in str(err.value)


@pytest.mark.parametrize("name", ["test_batch", "data_batch_3"])
def test_a_cifar_file_that_is_a_directory_or_missing_is_named(tmp_path, cifar_root, name):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for source in (cifar_root / "cifar-10-batches-py").iterdir():
        if source.name != name:
            (folder / source.name).write_bytes(source.read_bytes())
    with pytest.raises(layout.DataError, match=f"{folder / name} is missing"):
        layout.load_cifar10(tmp_path)
    (folder / name).mkdir()
    with pytest.raises(layout.DataError, match=f"{folder / name} is a directory, not a file"):
        layout.load_cifar10(tmp_path)


def test_a_data_root_one_level_too_deep_is_used_and_named(cifar_root):
    inner = cifar_root / "cifar-10-batches-py"
    for root, note in ((cifar_root, False), (inner, True)):
        cfg = config.load("configs/demo.yaml", [f"data.root={root}"])
        line = describe(cfg, resolve(cfg, torch.device("cpu"), 1, memory=memory))
        assert f"data: CIFAR-10 from {inner}," in line or f"data: CIFAR-10 from {inner} (" in line
        assert ("the files lie in data.root itself" in line) == note
    assert layout.check(inner)["train_images"] == 320


def test_the_cifar_generator_pointed_at_a_cifar_folder_itself_reads_it_as_data_root_does(tmp_path, capsys):
    root = tmp_path / "c10"
    assert cli.main(["data", "fake-cifar10", str(root), *SMALL]) == 0
    inner = root / "cifar-10-batches-py"
    before = _files(root)
    capsys.readouterr()
    assert cli.main(["data", "fake-cifar10", str(inner), *SMALL]) == 0
    assert capsys.readouterr().out.startswith(f"{inner} already holds this data set")
    (inner / "test_batch").write_bytes(b"altered")
    assert cli.main(["data", "fake-cifar10", str(inner), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{inner} already holds CIFAR-10 files" in err and "--force" in err
    assert cli.main(["data", "fake-cifar10", str(inner), *SMALL, "--force"]) == 0
    assert _files(root) == before  # written over in place, nothing nested
    fresh = tmp_path / "new" / "cifar-10-batches-py"  # a data.root named as the folder: the files go in it
    assert cli.main(["data", "fake-cifar10", str(fresh), *SMALL]) == 0
    assert sorted(p.name for p in fresh.iterdir()) == sorted(layout.CIFAR_TRAIN + ["batches.meta", "test_batch"])
    assert layout.cifar10_dir(fresh) == fresh


def test_a_generator_refuses_a_folder_holding_the_other_data_set(tmp_path, capsys, cifar_root, imagenet_root):
    cifar, imagenet = tmp_path / "cifar", tmp_path / "imagenet"  # copies: a failure must not touch the fixtures
    shutil.copytree(cifar_root, cifar)
    shutil.copytree(imagenet_root, imagenet)
    for command, root, names in (("fake-cifar10", imagenet, "train/, val/"),
                                 ("fake-imagenet", cifar, "cifar-10-batches-py")):
        before = _files(root)
        for force in ([], ["--force"]):
            assert cli.main(["data", command, str(root), *force]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{root} already holds" in err and names in err
            assert "pass another folder" in err
        assert _files(root) == before
    inner = cifar / "cifar-10-batches-py"  # CIFAR-10 files in the folder itself
    assert cli.main(["data", "fake-imagenet", str(inner)]) == 2 and "already holds CIFAR-10" in capsys.readouterr().err
    assert not (inner / "train").exists()
