"""Small data sets written in the real on-disk formats, for demos and tests.

Images carry a class-dependent colour and stripe pattern plus noise, so a network can
learn them and a run shows accuracy above chance.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from bnonly_dist.data.layout import CIFAR_TRAIN, DataError

CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _class_images(rng: np.random.Generator, labels: np.ndarray, height: int, width: int,
                  num_classes: int, noise: float = 70) -> np.ndarray:
    """uint8 images (N, H, W, 3) whose colour and stripe direction depend on the label."""
    hues = np.random.default_rng(1234).uniform(100, 155, size=(num_classes, 3))
    angles = np.linspace(0, np.pi, num_classes, endpoint=False)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    out = np.empty((len(labels), height, width, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin(2 * np.pi * 4 * (xx * np.cos(angles[label]) + yy * np.sin(angles[label])) + phase)
        image = hues[label] + 20 * stripes[..., None] + rng.normal(0, noise, size=(height, width, 3))
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def _make_dir(folder: Path, root: Path) -> None:
    """mkdir -p, or a DataError naming what is in the way (a file, no permission, a full disk)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker else err.strerror
        raise DataError(f"cannot write a data set to {root}: {why}; pass another directory") from None


@contextlib.contextmanager
def _writing(root: Path):
    """Turn a failed write (full disk, permissions) into a DataError naming root."""
    try:
        yield
    except OSError as err:
        raise DataError(f"cannot write a data set to {root} ({err.strerror}: {err.filename}); free space "
                        "or pass another directory") from None


def write_cifar10(root: str | Path, train_size: int = 2560, test_size: int = 1000, seed: int = 0,
                  force: bool = False) -> tuple[Path, bool]:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta (python pickles).
    (folder, written): a folder already holding this very data set is left as it is (written False);
    one holding other CIFAR-10 files is refused unless force, which writes over them."""
    root = Path(root)
    out = root / "cifar-10-batches-py"
    present = [name for name in CIFAR_FILES if (out / name).exists() or (out / name).is_symlink()]
    files = _cifar10_files(train_size, test_size, seed)
    if present and not force:
        _same_or_refuse(out, files, f"{out} already holds CIFAR-10 files ({present[0]}, ...)")
        return out, False
    _make_dir(out, root)
    with _writing(root):
        for name, data in files:
            (out / name).write_bytes(data)
    return out, True


CIFAR_FILES = [*CIFAR_TRAIN, "test_batch", "batches.meta"]


def _cifar10_files(train_size: int, test_size: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file of cifar-10-batches-py, in CIFAR_FILES' order."""
    rng = np.random.default_rng(seed)

    def batch(count: int, title: str) -> bytes:
        labels = rng.integers(0, 10, size=count)
        images = _class_images(rng, labels, 32, 32, 10)
        data = images.transpose(0, 3, 1, 2).reshape(count, 3072)  # rows of R, G, B planes
        entry = {b"batch_label": title.encode(), b"labels": labels.tolist(), b"data": data,
                 b"filenames": [f"fake_{title.split()[0]}_{i:05d}.png".encode() for i in range(count)]}
        return pickle.dumps(entry, protocol=2)

    per_batch = np.diff(np.linspace(0, train_size, 6).astype(int))
    for i, count in enumerate(per_batch, start=1):
        yield f"data_batch_{i}", batch(int(count), f"training batch {i} of 5")
    yield "test_batch", batch(test_size, "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": int(per_batch[0]), b"label_names": [n.encode() for n in CIFAR_LABELS],
            b"num_vis": 3072}
    yield "batches.meta", pickle.dumps(meta, protocol=2)


def _same_or_refuse(folder: Path, files: Iterable[tuple[str, bytes]], holds: str) -> None:
    """Return if every generated file is already in folder with the same bytes; else DataError (exit 2)."""
    for name, data in files:
        path = folder / name
        try:
            same = path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
        except OSError:
            same = False
        if not same:
            raise DataError(f"{holds}, not the data set these options generate ({path} differs); pass an empty "
                            "folder, or --force to write over them")


# Pixel noise (standard deviation) of photo_like images: about 100 KB per 333-500 px JPEG at
# quality 90, near an average ImageNet training file (~110 KB), where the default noise of 70
# gives 150 KB files of pure noise, slower to decode than photographs.
PHOTO_NOISE = 24


def write_imagenet(root: str | Path, num_classes: int = 10, train_per_class: int = 32,
                   val_per_class: int = 10, seed: int = 0, sides: tuple[int, int] = (64, 160),
                   photo_like: bool = False, force: bool = False) -> tuple[Path, bool]:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (class-folder layout), image sides drawn from [sides);
    photo_like: little pixel noise, so that files decode like photographs (decode benchmarks).
    (root, written): as write_cifar10; force replaces an earlier set of this generator (its own files
    only) and never touches class folders or files it did not make (a real ImageNet's)."""
    root = Path(root)
    wnids = [f"n{10000000 + 1111 * c:08d}" for c in range(num_classes)]
    counts = {"train": train_per_class, "val": val_per_class}
    wanted = {_image_name(split, wnid, i) for split, count in counts.items() for wnid in wnids for i in range(count)}
    files = _imagenet_files(wnids, counts, seed, sides, PHOTO_NOISE if photo_like else 70)
    splits = [split for split in counts if (root / split).is_dir() and any(os.scandir(root / split))]
    if splits:
        holds = f"{root / splits[0]} already holds a data set"
        foreign = sorted(e.name for split in splits for e in os.scandir(root / split) if not _OWN_CLASS.fullmatch(e.name))
        if foreign:  # a look at the class folders only: a real ImageNet is never listed file by file
            raise DataError(f"{holds} ({foreign[0]}/ is not a class folder of this generator); pass an empty folder")
        present = {p.relative_to(root).as_posix() for split in splits for p in (root / split).rglob("*")
                   if not p.is_dir()}
        stale = sorted(present - wanted)
        if not force:
            if stale or present != wanted:
                raise DataError(f"{holds}, not the one these options generate (other classes or image counts); pass "
                                "an empty folder, or --force to replace it")
            _same_or_refuse(root, files, holds)
            return root, False
        other = [name for name in stale if not _OWN_IMAGE.fullmatch(name)]
        if other:
            raise DataError(f"{holds} with files this generator does not make ({other[0]}, ...); pass an empty folder")
        with _writing(root):  # only this generator's own images of an earlier set, in its own class folders
            for name in stale:
                (root / name).unlink()
            for folder in {(root / name).parent for name in stale}:
                if not any(folder.iterdir()):
                    folder.rmdir()
    _make_dir(root, root)
    with _writing(root):
        for name, data in files:
            _make_dir((root / name).parent, root)
            (root / name).write_bytes(data)
    return root, True


# What this generator names its class folders and images (wnids n10000000 + 1111 * class).
_OWN_CLASS = re.compile(r"n1\d{7}")
_OWN_IMAGE = re.compile(r"(train|val)/(n1\d{7})/\2_\1_\d{5}\.JPEG")


def _image_name(split: str, wnid: str, index: int) -> str:
    return f"{split}/{wnid}/{wnid}_{split}_{index:05d}.JPEG"


def _imagenet_files(wnids: list[str], counts: dict[str, int], seed: int, sides: tuple[int, int],
                    noise: float) -> Iterator[tuple[str, bytes]]:
    """(split/wnid/file.JPEG, JPEG bytes) of every image, in one fixed order (one random stream)."""
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for label, wnid in enumerate(wnids):
            for i in range(per_class):
                height, width = rng.integers(*sides, size=2)
                image = _class_images(rng, np.array([label]), int(height), int(width), len(wnids), noise)[0]
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG", quality=90)
                yield _image_name(split, wnid, i), buffer.getvalue()
