"""What a data set is, wherever it lies: the record a run keeps of the data it trains on.

A run's identity holds what the data *is*, not where it lies (data.root is not part of it):
clusters copy the data set to a node-local disk per job, and the same command must resume
there. The record is the data set's name, class count, image counts and a digest: of the
image and label arrays for CIFAR-10 (they are in memory anyway), of the sorted file list
(path below the root, label, size) for ImageNet class folders. File contents are never
read for ImageNet: at 1.28 M files that would take hours; a stat per file, in parallel,
does not. rundir keeps the record in RUN/data.json and every checkpoint's commit.json
carries it; a resume on other data is refused with the first field that differs.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# Read in this order when naming what differs: the plainest difference first.
FIELDS = ("name", "classes", "train_images", "val_images", "digest")


def of_arrays(name: str, classes: int, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
              ) -> dict:
    """The record of a data set held as (images, labels) arrays."""
    digest = hashlib.sha256()
    for array in (*train, *test):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).data)
    return {"name": name, "classes": classes, "train_images": len(train[1]), "val_images": len(test[1]),
            "digest": "sha256:" + digest.hexdigest()}


STAT_CHUNK = 4096  # files per task of the stat pool: one future per file would cost more than the stat


def _sizes(paths: list[str]) -> list[int]:
    return [os.stat(path).st_size for path in paths]


def of_listing(name: str, root: str, classes: list[str], train: list[tuple[str, int]], val: list[tuple[str, int]]
               ) -> dict:
    """The record of class folders listed as [(path, label)] under root: names, labels and sizes, not contents."""
    prefix = len(os.path.join(str(Path(root)), ""))  # the items were listed under Path(root)
    digest = hashlib.sha256("\n".join(classes).encode())
    with ThreadPoolExecutor(16) as pool:  # on a network file system latency, not CPU, bounds the stats
        for split, items in (("train", train), ("val", val)):
            chunks = [[path for path, _ in items[i:i + STAT_CHUNK]] for i in range(0, len(items), STAT_CHUNK)]
            sizes = (size for chunk in pool.map(_sizes, chunks) for size in chunk)
            digest.update(f"\n{split}\n".encode())
            digest.update("".join(f"{path[prefix:]}\t{label}\t{size}\n"
                                  for (path, label), size in zip(items, sizes)).encode())
    return {"name": name, "classes": len(classes), "train_images": len(train), "val_images": len(val),
            "digest": "sha256:" + digest.hexdigest()}


def difference(old: dict, new: dict) -> str | None:
    """The first field in which two records differ, said in words; None if they agree."""
    for field in FIELDS:
        if old.get(field) != new.get(field):
            if field == "digest":
                what = "image and label arrays" if new.get("name") == "cifar10" else "file list (names, labels, sizes)"
                return f"the same counts but another {what}"
            return f"{field}={old.get(field)!r}, not {new.get(field)!r}"
    return None
