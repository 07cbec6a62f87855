"""Small data sets written in the real on-disk formats, for demos and tests.

Images carry a class-dependent colour and stripe pattern plus noise, so a network can
learn them and a run shows accuracy above chance.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _class_images(rng: np.random.Generator, labels: np.ndarray, height: int, width: int,
                  num_classes: int) -> np.ndarray:
    """uint8 images (N, H, W, 3) whose colour and stripe direction depend on the label."""
    hues = np.random.default_rng(1234).uniform(100, 155, size=(num_classes, 3))
    angles = np.linspace(0, np.pi, num_classes, endpoint=False)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    out = np.empty((len(labels), height, width, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin(2 * np.pi * 4 * (xx * np.cos(angles[label]) + yy * np.sin(angles[label])) + phase)
        image = hues[label] + 20 * stripes[..., None] + rng.normal(0, 70, size=(height, width, 3))
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def write_cifar10(root: str | Path, train_size: int = 2560, test_size: int = 1000, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta (python pickles)."""
    out = Path(root) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
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


def write_imagenet(root: str | Path, num_classes: int = 10, train_per_class: int = 32,
                   val_per_class: int = 10, seed: int = 0, sides: tuple[int, int] = (64, 160)) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (class-folder layout), image sides drawn from [sides)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [f"n{10000000 + 1111 * c:08d}" for c in range(num_classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                height, width = rng.integers(*sides, size=2)
                image = _class_images(rng, np.array([label]), int(height), int(width), num_classes)[0]
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG", quality=90)
                (folder / f"{wnid}_{split}_{i:05d}.JPEG").write_bytes(buffer.getvalue())
    return root
