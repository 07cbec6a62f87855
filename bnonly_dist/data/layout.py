"""Finding and validating data sets on disk: CIFAR-10 pickles and ImageNet class folders."""
from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG SOI marker, PNG signature
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class DataError(ValueError):
    """A missing or malformed data set: the message names the problem and the fix."""


class DamagedData(DataError):
    """A file of the data set is corrupt (an image that does not decode, a garbled batch file)."""


def cifar10_dir(root: str | Path) -> Path:
    """The folder of the CIFAR-10 files: root/cifar-10-batches-py, or root itself where data.root names that
    folder (one level too deep, accepted). DataError naming the file when one is missing or not a file."""
    root = Path(root)
    for candidate in (root / "cifar-10-batches-py", root):
        if candidate.is_dir() and any((candidate / name).exists() for name in (*CIFAR_TRAIN, "test_batch")):
            for name in (*CIFAR_TRAIN, "test_batch"):
                path = candidate / name
                if not path.is_file():
                    what = "a directory, not a file" if path.is_dir() else "missing"
                    raise DataError(f"{path} is {what}; the CIFAR-10 folder must hold {', '.join(CIFAR_TRAIN)} and "
                                    "test_batch as files (the python version of CIFAR-10)")
            return candidate
    raise DataError(f"no CIFAR-10 at {root}: expected cifar-10-batches-py/ with data_batch_1..5 and test_batch (get "
                    f"the python version of CIFAR-10; to try the code on generated data instead: `bnonly data "
                    f"fake-cifar10 {SCRATCH_CIFAR}` and data.root={SCRATCH_CIFAR})")


# Where a hint tells a user to generate a trial data set: a scratch folder of the project, never the
# data.root that was asked for (which may be where the real data set belongs).
SCRATCH_CIFAR = "runs/data/fake-cifar10"


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} is missing; the CIFAR-10 directory must hold {', '.join(CIFAR_TRAIN)} and test_batch")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise DamagedData(f"{path} is not a CIFAR-10 python batch ({type(err).__name__}); "
                        "re-download or regenerate it") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and {len(labels)}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images uint8 N x 3 x 32 x 32, labels), 'test': (...)} from the official pickles."""
    folder = cifar10_dir(root)
    parts = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return {"train": train, "test": _read_cifar_batch(folder / "test_batch")}


def _list_split(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    items = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise DataError(f"{class_dir} is missing: train/ and val/ must hold the same class folders")
        files = sorted(e.path for e in os.scandir(class_dir)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"{class_dir} holds no images (.JPEG/.jpg/.png); remove the folder or add its images")
        items.extend((path, label) for path in files)
    return items


def _header_ok(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8).startswith(IMAGE_MAGIC)
    except OSError:
        return False


def bad_headers(paths: list[str]) -> list[str]:
    """The files among paths that do not start like a JPEG or PNG (one small read each, in parallel)."""
    with ThreadPoolExecutor(16) as pool:  # file-system latency, not CPU, bounds this
        return [p for p, ok in zip(paths, pool.map(_header_ok, paths)) if not ok]


def require_images(paths: list[str], split: str) -> None:
    bad = bad_headers(paths)
    if bad:
        raise DamagedData(f"{bad[0]} is not a JPEG or PNG image (its first bytes say so; {len(bad)} such file(s) "
                        f"in {split}); delete or replace it (`bnonly data check DIR --decode` lists all)")


def check_num_classes(configured: int | None, found: int, where: str) -> None:
    """DataError if model.num_classes leaves out labels the data holds (call once the data is opened)."""
    if configured is not None and configured < found:
        raise DataError(f"model.num_classes={configured} is smaller than the {found} classes in {where}; "
                        f"set model.num_classes={found} (or leave it unset: the data's count)")


def imagenet_index(root: str | Path, check_val: bool = True
                   ) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(class names, [(train file, label)], [(val file, label)]) from root/{train,val}/<class>/."""
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise DataError(f"no ImageNet at {root}: expected train/<class>/*.JPEG and val/<class>/*.JPEG "
                        "(sort val into class folders, or try `bnonly data fake-imagenet DIR`)")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise DataError(f"{train_dir} has no class folders; expected train/<class>/*.JPEG")
    extra = sorted({e.name for e in os.scandir(val_dir) if e.is_dir()} - set(classes))
    if extra:
        raise DataError(f"{val_dir} has class folders not in train/ ({extra[0]}, ...); both must hold the same classes")
    train, val = _list_split(train_dir, classes), _list_split(val_dir, classes)
    if check_val:  # the evaluation would only meet a bad file after the first epoch
        require_images([p for p, _ in val], str(val_dir))
    return classes, train, val


def find_corrupt(paths: list[str]) -> list[str]:
    """The files among paths that do not decode completely."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:  # noqa: BLE001 - any decoder failure means the file is unusable
            bad.append(path)
    return bad


def spread_sample(items: list, count: int | None) -> list:
    """count items spread evenly over the list (every class folder gets its share); all if None."""
    if count is None or count >= len(items):
        return items
    return [items[i * len(items) // count] for i in range(count)]


def check(root: str | Path, decode: bool = False, sample: int | None = None) -> dict:
    """Validate a data set; returns a summary or raises DataError naming the first problem.
    sample: check the headers of this many ImageNet files per split, spread over the classes
    (a launcher's quick look), instead of every one."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist; pass the directory that holds the data set")
    if (root / "train").is_dir():
        classes, train, val = imagenet_index(root, check_val=sample is None)
        train_paths, val_paths = (spread_sample([p for p, _ in split], sample) for split in (train, val))
        require_images(train_paths, str(root / "train"))
        if sample is not None:
            require_images(val_paths, str(root / "val"))
        report = {"format": "imagenet", "root": str(root), "classes": len(classes),
                  "train_images": len(train), "val_images": len(val),
                  "headers_checked": len(train_paths) + (len(val_paths) if sample is not None else len(val))}
        if decode:
            bad = find_corrupt([p for p, _ in train + val])
            if bad:
                raise DamagedData(f"{len(bad)} corrupt image(s), first {bad[0]}; delete or replace them")
            report["decoded"] = True
        return report
    splits = load_cifar10(root)
    return {"format": "cifar10", "root": str(cifar10_dir(root)), "classes": 10,
            "train_images": len(splits["train"][1]), "val_images": len(splits["test"][1])}
