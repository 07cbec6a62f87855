import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnonly_dist.config import ConfigError
from bnonly_dist.data import layout, sharding
from bnonly_dist.data.cifar import CifarSource, augment
from bnonly_dist.data.dali import DaliImageNetSource
from bnonly_dist.data.layout import DataError
from bnonly_dist.config.plan import per_rank

CPU = torch.device("cpu")


def dali_source(root, rank=0, world=1, global_batch=8, eval_batch=6):
    return DaliImageNetSource(str(root), global_batch, eval_batch, rank, world, seed=0, device=CPU, decode="cpu",
                              num_threads=1, image_size=32, resize_size=40, min_area=0.1)


def test_fake_cifar_is_the_official_format(cifar_root):
    folder = cifar_root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                                                        "data_batch_4", "data_batch_5", "test_batch"]
    with open(folder / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape[1] == 3072
    assert isinstance(entry[b"labels"], list) and len(entry[b"labels"]) == len(entry[b"data"])
    with open(folder / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"label_names"][0] == b"airplane"
    report = layout.check(cifar_root)
    assert (report["format"], report["train_images"], report["val_images"]) == ("cifar10", 320, 103)


def test_fake_imagenet_is_class_folders(imagenet_root):
    classes, train, val = layout.imagenet_index(imagenet_root)
    assert len(classes) == 4 and len(train) == 32 and len(val) == 20
    assert all(p.endswith(".JPEG") for p, _ in train)
    assert layout.check(imagenet_root, decode=True)["decoded"]


def test_check_cli(imagenet_root, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "data", "check", str(imagenet_root)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and '"imagenet"' in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "data", "check", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no CIFAR-10" in bad.stderr and bad.stderr.count("\n") == 1


def test_malformed_data_sets_are_named(tmp_path, cifar_root):
    with pytest.raises(DataError, match="does not exist"):
        layout.check(tmp_path / "missing")
    broken = tmp_path / "c" / "cifar-10-batches-py"
    broken.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (broken / name).write_bytes((cifar_root / "cifar-10-batches-py" / name).read_bytes())
    (broken / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 python batch"):
        layout.load_cifar10(tmp_path / "c")
    (broken / "data_batch_3").write_bytes((cifar_root / "cifar-10-batches-py" / "data_batch_3").read_bytes())
    (broken / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4 is missing"):
        layout.load_cifar10(tmp_path / "c")
    (tmp_path / "in" / "train" / "n01").mkdir(parents=True)
    (tmp_path / "in" / "val" / "n01").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        layout.imagenet_index(tmp_path / "in")
    (tmp_path / "in" / "val" / "n02").mkdir()
    with pytest.raises(DataError, match="not in train/"):
        layout.imagenet_index(tmp_path / "in")


def test_corrupt_jpeg_is_named(tmp_path, imagenet_root):
    import shutil
    root = tmp_path / "in"
    shutil.copytree(imagenet_root, root)
    victim = sorted((root / "train").rglob("*.JPEG"))[5]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated mid-scan
    with pytest.raises(DataError, match="1 corrupt image"):
        layout.check(root, decode=True)
    source = dali_source(root, global_batch=32)  # one batch holds every training image
    with pytest.raises(DataError, match=f"corrupt image {victim}"):
        list(source.train_epoch(0))


def test_corrupt_jpeg_right_after_a_resume_is_named(tmp_path, imagenet_root):
    import shutil
    root = tmp_path / "in"
    shutil.copytree(imagenet_root, root)
    source = dali_source(root)  # 4 steps per epoch
    for epoch in range(2):
        list(source.train_epoch(epoch))
    batches = source.train_epoch(2)
    next(batches)
    state = source.state()  # the pipeline began at (0, 0); the run resumes at (2, 1)
    first = source._feeder.files(0, 0, 3)  # the first batches of the run: not where it resumes
    victim = Path(next(f for f in source._feeder.files(2, 1, 1) if f not in first))
    victim.write_bytes(b"not a JPEG" * 10)  # fails as the restored pipeline is built (it decodes ahead)
    again = dali_source(root)
    again.load_state(state)
    with pytest.raises(DataError, match=f"corrupt image {victim}"):
        list(again.train_epoch(2, start_step=1))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_sharding_sees_each_image_once_per_epoch(world):
    n, batch = 103, 12
    perm = sharding.epoch_permutation(n, seed=0, epoch=4)
    shards = [sharding.rank_train_indices(perm, batch, r, world) for r in range(world)]
    seen = np.concatenate(shards)
    assert len(seen) == (n // batch) * batch == len(set(seen.tolist()))
    # same samples in the same global batches, whatever the world size
    one = sharding.rank_train_indices(perm, batch, 0, 1)
    for step in range(n // batch):
        parts = [s[step * batch // world:(step + 1) * batch // world] for s in shards]
        assert sorted(np.concatenate(parts)) == sorted(one[step * batch:(step + 1) * batch])


def test_batch_must_divide_world():
    with pytest.raises(ConfigError, match="multiple of 3"):
        per_rank(128, 3)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_sharding_counts_each_image_once(world):
    n = 103
    shards = [sharding.rank_eval_indices(n, r, world) for r in range(world)]
    assert len({len(i) for i, _ in shards}) == 1  # equal lengths: no rank waits on another
    counted = np.concatenate([i[v] for i, v in shards])
    assert sorted(counted.tolist()) == list(range(n))


def test_cifar_loader_resumes_and_reshards_exactly(cifar_root):
    one = CifarSource(str(cifar_root), 32, 50, 0, 1, 0, CPU)
    full = list(one.train_epoch(1))
    assert len(full) == one.steps_per_epoch == 10
    resumed = list(one.train_epoch(1, start_step=6))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[6:], resumed))
    two = [list(CifarSource(str(cifar_root), 32, 50, r, 2, 0, CPU).train_epoch(1)) for r in range(2)]
    for step in range(10):
        joined = torch.cat([two[0][step][0], two[1][step][0]])
        assert torch.equal(joined, full[step][0])  # same pixels at world size 2
    assert not torch.equal(full[0][0], list(one.train_epoch(2))[0][0])  # a new epoch, a new order


def test_cifar_eval_counts_every_image_once(cifar_root):
    labels = []
    for rank in range(3):
        source = CifarSource(str(cifar_root), 33, 40, rank, 3, 0, CPU)
        labels += [y for _, batch in source.eval_batches() for y in batch.tolist()]
    valid = [y for y in labels if y >= 0]
    assert len(valid) == 103
    assert sorted(valid) == sorted(layout.load_cifar10(cifar_root)["test"][1].tolist())


def test_augment_crop_and_flip():
    image = torch.arange(3 * 32 * 32, dtype=torch.int64).view(1, 3, 32, 32) + 1
    same = augment(image, torch.tensor([[4, 4]]), torch.tensor([False]))
    assert torch.equal(same, image)
    flipped = augment(image, torch.tensor([[4, 4]]), torch.tensor([True]))
    assert torch.equal(flipped, image.flip(3))
    shifted = augment(image, torch.tensor([[0, 8]]), torch.tensor([False]))
    assert (shifted[0, :, :4] == 0).all() and torch.equal(shifted[0, :, 4:, :28], image[0, :, :28, 4:])


def test_dali_train_shards_cover_epoch_once(imagenet_root):
    _, train, _ = layout.imagenet_index(imagenet_root)
    labels = []
    for rank in range(2):
        source = dali_source(imagenet_root, rank, 2, global_batch=8)
        batches = list(source.train_epoch(0))
        assert len(batches) == source.steps_per_epoch == 4
        assert batches[0][0].shape == (4, 3, 32, 32) and batches[0][0].dtype == torch.float32
        labels += [y for _, b in batches for y in b.tolist()]
    assert sorted(labels) == sorted(label for _, label in train)  # 32 images, 8 per class, each once


def solid_colour_imagenet(root, classes=3, per_class=10):
    """Every image one flat colour whose red channel names it: any crop still says which image it is."""
    from PIL import Image
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True)
            for i in range(per_class):
                image_id = c * per_class + i
                colour = (20 + 7 * image_id, 255 - 7 * image_id, 128)
                Image.new("RGB", (40, 48), colour).save(root / split / f"n{c:08d}" / f"{image_id}.JPEG", quality=95)
    return root


def image_ids(images):
    red = images[:, 0].mean(dim=(1, 2)) * 0.229 * 255 + 0.485 * 255  # undo the normalisation
    return ((red - 20) / 7).round().long().tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_dali_ranks_see_every_image_once_per_epoch(tmp_path, world):
    root = solid_colour_imagenet(tmp_path)  # 30 images
    sources = [dali_source(root, rank, world, global_batch=6) for rank in range(world)]
    orders = []
    for epoch in (0, 1, 2):
        seen = []
        for source in sources:  # one pipeline per rank, reused epoch after epoch
            for images, labels in source.train_epoch(epoch):
                ids = image_ids(images)
                assert labels.tolist() == [i // 10 for i in ids]  # each label travels with its image
                seen += ids
        assert sorted(seen) == list(range(30))
        orders.append(seen)
        assert orders[-1] == [i for s in sources for i in s._feeder.indices(epoch, 0, 5)]  # sharding.py's order
    assert orders[0] != orders[1] != orders[2]  # a new permutation each epoch
    assert [s.train_pipelines_built for s in sources] == [1] * world


def batches_equal(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(xs, ys))


def test_dali_builds_the_training_pipeline_once(imagenet_root):
    source = dali_source(imagenet_root)  # 32 images, 4 steps per epoch
    epochs = []
    for epoch in range(3):
        epochs.append(list(source.train_epoch(epoch)))
        list(source.eval_batches())
    assert source.train_pipelines_built == 1 and source.eval_pipelines_built == 1
    half = source.train_epoch(3)
    next(half)
    half.close()  # left half way: the next epoch cannot follow on, so it builds afresh
    fresh = dali_source(imagenet_root)
    assert batches_equal(list(source.train_epoch(3, start_step=1)), list(fresh.train_epoch(3, start_step=1)))
    assert source.train_pipelines_built == 2
    assert not batches_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("saved_at", [(0, 2), (1, 1), (1, 4)])  # mid-epoch, in a reused pipeline, at an epoch end
def test_dali_resume_is_bit_exact_wherever_it_was_saved(imagenet_root, saved_at):
    source = dali_source(imagenet_root)
    epoch, step = saved_at
    for e in range(epoch):
        list(source.train_epoch(e))
    batches = source.train_epoch(epoch)
    for _ in range(step):
        next(batches)
    state = source.state()
    rest = list(batches) + list(source.train_epoch(epoch + 1))
    again = dali_source(imagenet_root)
    again.load_state(state)
    e, s = (epoch + 1, 0) if step == again.steps_per_epoch else (epoch, step)  # what the loop asks for
    resumed = [b for e2 in range(e, epoch + 2) for b in again.train_epoch(e2, s if e2 == e else 0)]
    assert batches_equal(rest, resumed) and len(resumed) >= 4


def test_dali_state_of_an_earlier_pipeline_resumes_with_fresh_randomness(imagenet_root, caplog):
    source = dali_source(imagenet_root)
    batches = source.train_epoch(0)
    next(batches)
    state = source.state()
    del state["origin"]  # what the pipeline of an earlier version saved
    again = dali_source(imagenet_root)
    again.load_state(state)
    resumed = list(again.train_epoch(0, start_step=1))
    assert "earlier version" in caplog.text
    assert [b[1].tolist() for b in resumed] == [b[1].tolist() for b in batches]  # same images, same order


def test_dali_resume_is_bit_exact(imagenet_root):
    source = dali_source(imagenet_root)
    batches = source.train_epoch(1)
    next(batches)
    next(batches)
    state = source.state()
    rest = [b for b in batches]
    again = dali_source(imagenet_root)
    again.load_state(state)
    resumed = list(again.train_epoch(1, start_step=2))
    assert len(resumed) == len(rest) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, resumed))


def test_dali_eval_counts_every_image_once(imagenet_root):
    labels = []
    for rank in range(3):
        for images, batch in dali_source(imagenet_root, rank, 3, global_batch=3).eval_batches():
            assert images.shape[1:] == (3, 32, 32)
            labels += batch.tolist()
    assert sorted(y for y in labels if y >= 0) == sorted([c for c in range(4) for _ in range(5)])
