"""Small data sets written in the real on-disk formats, for demos and tests.

Images carry a class-dependent colour and stripe pattern plus noise, so a network can
learn them and a run shows accuracy above chance.
"""
from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from bnonly_dist.data.layout import DataError

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


def write_cifar10(root: str | Path, train_size: int = 2560, test_size: int = 1000, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta (python pickles)."""
    out = Path(root) / "cifar-10-batches-py"
    _make_dir(out, Path(root))
    with _writing(Path(root)):
        return _write_cifar10(out, train_size, test_size, seed)


def _write_cifar10(out: Path, train_size: int, test_size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)

    def batch(path: Path, count: int, title: str) -> None:
        labels = rng.integers(0, 10, size=count)
        images = _class_images(rng, labels, 32, 32, 10)
        data = images.transpose(0, 3, 1, 2).reshape(count, 3072)  # rows of R, G, B planes
        entry = {b"batch_label": title.encode(), b"labels": labels.tolist(), b"data": data,
                 b"filenames": [f"fake_{title.split()[0]}_{i:05d}.png".encode() for i in range(count)]}
        with open(path, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    per_batch = np.diff(np.linspace(0, train_size, 6).astype(int))
    for i, count in enumerate(per_batch, start=1):
        batch(out / f"data_batch_{i}", int(count), f"training batch {i} of 5")
    batch(out / "test_batch", test_size, "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": int(per_batch[0]), b"label_names": [n.encode() for n in CIFAR_LABELS],
            b"num_vis": 3072}
    with open(out / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return out


# Pixel noise (standard deviation) of photo_like images: about 100 KB per 333-500 px JPEG at
# quality 90, near an average ImageNet training file (~110 KB), where the default noise of 70
# gives 150 KB files of pure noise, slower to decode than photographs.
PHOTO_NOISE = 24


def write_imagenet(root: str | Path, num_classes: int = 10, train_per_class: int = 32,
                   val_per_class: int = 10, seed: int = 0, sides: tuple[int, int] = (64, 160),
                   photo_like: bool = False) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (class-folder layout), image sides drawn from [sides);
    photo_like: little pixel noise, so that files decode like photographs (decode benchmarks)."""
    root = Path(root)
    _make_dir(root, root)
    with _writing(root):
        _write_imagenet(root, num_classes, train_per_class, val_per_class, seed, sides, PHOTO_NOISE if photo_like else 70)
    return root


def _write_imagenet(root: Path, num_classes: int, train_per_class: int, val_per_class: int, seed: int,
                    sides: tuple[int, int], noise: float) -> None:
    rng = np.random.default_rng(seed)
    wnids = [f"n{10000000 + 1111 * c:08d}" for c in range(num_classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(wnids):
            folder = root / split / wnid
            _make_dir(folder, root)
            for i in range(per_class):
                height, width = rng.integers(*sides, size=2)
                image = _class_images(rng, np.array([label]), int(height), int(width), num_classes, noise)[0]
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG", quality=90)
                (folder / f"{wnid}_{split}_{i:05d}.JPEG").write_bytes(buffer.getvalue())
