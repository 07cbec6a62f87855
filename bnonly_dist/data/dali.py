"""ImageNet class folders read and augmented by NVIDIA DALI.

Train: RandomResizedCrop(size, scale=(min_area, 1), ratio=(0.8, 1.25)) fused into the
JPEG decode, then flip. Eval: resize shorter side to resize_size, centre crop size.
Decode runs on 'cpu', or 'mixed' (nvJPEG on the GPU). With decode=cpu on a GPU run the
decoded crops move to the GPU inside DALI (its pinned staging, its stream) and resize and
normalize run there, so no pageable host batch is copied by the loop. Under channels_last
DALI writes HWC and the batch is a channels_last view of it: no layout copy per batch.

Both pipelines are built once and reused. The training pipeline takes its file names from
an external source that maps DALI's (epoch_idx, iteration) to this rank's slice of the
global batch data/sharding.py gives for (epoch, step), so every epoch keeps the order that
makes resume and resharding exact while DALI's threads read and decode the files. DALI's
own checkpoint (random state of the augmentations and the source's position) gives an
exact resume at the same world size; the evaluation pipeline is reset between passes.
Rank 0 alone lists the folders and checks the validation headers; the others get its listing.
"""
from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bnonly_dist import dist
from bnonly_dist.data import sharding
from bnonly_dist.data.layout import DamagedData, DataError, find_corrupt, imagenet_index
from bnonly_dist.models.init import name_seed
from bnonly_dist.config.plan import per_rank

log = logging.getLogger(__name__)
PREFETCH_DEPTH = 2  # batches DALI decodes ahead of the loop
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def _dali():
    try:
        import nvidia.dali as dali
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError:
        raise DataError("ImageNet data needs NVIDIA DALI: pip install 'bnonly-dist[dali]'") from None
    return dali, DALIGenericIterator, LastBatchPolicy


def _to_gpu(images, label, decode: str, on_gpu: bool):
    """Outputs on the run's device: cpu decode on a GPU run moves to the GPU here, in DALI."""
    if on_gpu and decode == "cpu":
        images = images.gpu()
    return images, label.gpu() if on_gpu else label


class EpochFeeder:
    """The training pipeline's external source: DALI's (epoch_idx, iteration) -> (epoch, step)
    -> this rank's file names (as DALI's io.file.read wants them) and labels.

    origin is the (epoch, step) of DALI's first batch; a restored pipeline carries on from
    its saved (epoch_idx, iteration), so the same origin gives the same (epoch, step)."""

    def __init__(self, items: list[tuple[str, int]], seed: int, global_batch: int, rank: int, world: int,
                 origin: tuple[int, int]):
        self.items, self.seed, self.global_batch, self.rank, self.world = items, seed, global_batch, rank, world
        self.local_batch = per_rank(global_batch, world)
        self.steps_per_epoch = sharding.steps_per_epoch(len(items), global_batch)
        self.origin = origin
        self._epoch, self._indices = None, None  # the one epoch whose order is held

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int]:
        return self.origin[0] + epoch_idx, iteration + (self.origin[1] if epoch_idx == 0 else 0)

    def indices(self, epoch: int, step: int, count: int) -> np.ndarray:
        """This rank's sample indices for count steps from (epoch, step)."""
        if epoch != self._epoch:
            perm = sharding.epoch_permutation(len(self.items), self.seed, epoch)
            self._epoch, self._indices = epoch, sharding.rank_train_indices(perm, self.global_batch, self.rank,
                                                                            self.world)
        return self._indices[step * self.local_batch:(step + count) * self.local_batch]

    def files(self, epoch: int, step: int, count: int) -> list[str]:
        return [self.items[i][0] for i in self.indices(epoch, step, count)]

    def __call__(self, info):
        epoch, step = self.position(info.epoch_idx, info.iteration)
        if step >= self.steps_per_epoch:
            raise StopIteration  # DALI's end of epoch; reset() starts epoch_idx + 1
        batch = [self.items[i] for i in self.indices(epoch, step, 1)]
        names = [np.frombuffer(path.encode(), dtype=np.uint8) for path, _ in batch]
        return names, [np.array([label], dtype=np.int32) for _, label in batch]


def _train_pipeline(feeder, size, min_area, decode, layout, on_gpu, **kwargs):
    dali, _, _ = _dali()
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(enable_checkpointing=True)
    def pipeline():
        names, label = fn.external_source(source=feeder, num_outputs=2, batch=True, batch_info=True)
        jpegs = fn.io.file.read(names)  # in DALI's threads, not the loop's
        images = fn.decoders.image_random_crop(jpegs, device=decode, output_type=types.RGB,
                                               random_area=[min_area, 1.0], random_aspect_ratio=[0.8, 1.25],
                                               num_attempts=10)
        images, label = _to_gpu(images, label, decode, on_gpu)
        images = fn.resize(images, resize_x=size, resize_y=size)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=MEAN, std=STD,
                                          mirror=fn.random.coin_flip(probability=0.5))
        return images, label

    return pipeline(**kwargs)


def _eval_pipeline(files, labels, size, resize_size, decode, layout, on_gpu, **kwargs):
    dali, _, _ = _dali()
    fn, types = dali.fn, dali.types

    @dali.pipeline_def
    def pipeline():
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader",
                                       pad_last_batch=True)
        images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
        images, label = _to_gpu(images, label, decode, on_gpu)
        images = fn.resize(images, resize_shorter=resize_size)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, crop=(size, size),
                                          mean=MEAN, std=STD)
        return images, label

    return pipeline(**kwargs)


def _pack(items: list[tuple[str, int]]) -> tuple[np.ndarray, list[str]]:
    """(labels, file names) of a split: a third of the bytes of the full paths, rebuilt by _unpack."""
    return np.array([label for _, label in items], dtype=np.int32), [os.path.basename(p) for p, _ in items]


def _unpack(root: str, classes: list[str], packed: tuple[np.ndarray, list[str]], split: str) -> list[tuple[str, int]]:
    folders = [os.path.join(str(Path(root) / split), name) for name in classes]  # as os.scandir writes them
    labels, names = packed
    return [(os.path.join(folders[label], name), int(label)) for label, name in zip(labels.tolist(), names)]


def shared_index(root: str, rank: int, world: int) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """imagenet_index on rank 0 alone (listing 1.28M files and opening 50k headers once, not on
    every rank of every node), its listing or its DataError shared with the others (collective:
    a broadcast over the host-side group)."""
    if world == 1 or not torch.distributed.is_initialized():  # no peers to share with (a test's ranks in one process)
        return imagenet_index(root)
    verdict = None
    if rank == 0:
        try:
            classes, train, val = imagenet_index(root)
            verdict = ("ok", classes, _pack(train), _pack(val))
        except DataError as err:
            verdict = ("error", str(err))
    verdict = dist.broadcast_object(verdict)
    if verdict[0] == "error":
        raise DataError(verdict[1])
    _, classes, train, val = verdict
    return classes, _unpack(root, classes, train, "train"), _unpack(root, classes, val, "val")


class DaliImageNetSource:
    def __init__(self, root: str, global_batch: int, eval_batch: int, rank: int, world: int, seed: int,
                 device: torch.device, decode: str, num_threads: int, image_size: int, resize_size: int,
                 min_area: float, channels_last: bool = False):
        self.classes, self.train_items, self.val_items = shared_index(root, rank, world)
        self.num_classes = len(self.classes)
        self.rank, self.world, self.seed, self.device = rank, world, seed, device
        self.global_batch = global_batch
        self.local_batch = per_rank(global_batch, world)
        self.eval_local_batch = max(1, eval_batch // world)
        self.steps_per_epoch = sharding.steps_per_epoch(len(self.train_items), global_batch)
        self.eval_size = len(self.val_items)
        self.decode = decode
        self.on_gpu = device.type == "cuda"
        self.channels_last = channels_last
        self.layout = "HWC" if channels_last else "CHW"
        self.common = dict(num_threads=num_threads, device_id=device.index if self.on_gpu else None,
                           prefetch_queue_depth=PREFETCH_DEPTH)
        self.prefetch_depth = PREFETCH_DEPTH
        self.image_size, self.resize_size, self.min_area = image_size, resize_size, min_area
        self._train = None  # the training iterator, built at the first epoch
        self._feeder = None  # its external source
        self._train_next = None  # (epoch, step) the training iterator hands out next, None if unknown
        self._position = None  # (epoch, step) of the next batch
        self._dali_state = None  # DALI's checkpoint after the last batch handed out (None: ask the iterator)
        self._resume = None  # a saved state to restore at the next train_epoch
        self._eval = None  # the evaluation iterator, built at the first pass
        self._eval_clean = False  # the last evaluation pass ran to its end, so reset() may rewind it
        self.train_pipelines_built = 0
        self.eval_pipelines_built = 0

    @staticmethod
    def _decode_failure(err: RuntimeError, files: list[str]) -> DataError:
        bad = find_corrupt(files)
        how = "delete or replace it (`bnonly data check DIR --decode` lists all)"
        if bad:  # a damaged file: never cured by a restart
            return DamagedData(f"corrupt image {bad[0]}; {how}")
        return DataError(f"DALI failed ({str(err).splitlines()[0]}); {how}")

    def _iterator(self, pipe, files: list[str], train: bool):
        """The DALI iterator over a built pipe; a decode failure becomes a DataError naming the file."""
        _, iterator_cls, last_batch = _dali()
        try:  # the iterator decodes its first batches as it is built
            pipe.build()
            if train:  # the external source ends each epoch, with whole batches only
                return iterator_cls([pipe], ["images", "labels"], auto_reset=False)
            return iterator_cls([pipe], ["images", "labels"], reader_name="Reader", auto_reset=False,
                                last_batch_policy=last_batch.PARTIAL)
        except RuntimeError as err:
            raise self._decode_failure(err, files) from None

    def _batch(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A DALI batch in the model's layout (HWC becomes a channels_last view)."""
        images = out["images"].permute(0, 3, 1, 2) if self.channels_last else out["images"]
        return images, out["labels"].view(-1).long()

    def _batches(self, iterator, files: list[str], local_batch: int, count: int):
        """Yield up to count evaluation batches."""
        for i in range(count):
            try:
                out = next(iterator)[0]
            except StopIteration:
                return
            except RuntimeError as err:  # DALI decodes a few batches ahead
                raise self._decode_failure(err, files[i * local_batch:(i + 4) * local_batch]) from None
            yield self._batch(out)

    def _take_resume(self, epoch: int, start_step: int) -> dict | None:
        saved, self._resume = self._resume, None
        if saved and self._normal(*saved["position"]) != (epoch, start_step):
            log.warning("data state saved at %s, resuming at %s: augmentations draw fresh random numbers",
                        saved["position"], [epoch, start_step])
            return None
        return saved

    def _normal(self, epoch: int, step: int) -> tuple[int, int]:
        """(epoch, step) with the end of an epoch written as the start of the next."""
        return (epoch + 1, 0) if step >= self.steps_per_epoch else (epoch, step)

    def _build_train(self, origin: tuple[int, int], checkpoint: bytes | None, at: tuple[int, int]) -> None:
        """A training pipeline whose first batch is at origin, restored to `at` from checkpoint."""
        self._train, self._position = None, None  # the old pipeline goes before the new one is built
        self._feeder = EpochFeeder(self.train_items, self.seed, self.global_batch, self.rank, self.world, origin)
        pipe = _train_pipeline(self._feeder, self.image_size, self.min_area, self.decode, self.layout, self.on_gpu,
                               batch_size=self.local_batch,
                               seed=name_seed(self.seed, f"dali/{origin[0]}/{origin[1]}/{self.rank}") % 2**31,
                               checkpoint=checkpoint, **self.common)
        first = self._feeder.files(*at, 3) if at[1] < self.steps_per_epoch else []  # decoded as it is built
        self._train = self._iterator(pipe, first, train=True)
        self.train_pipelines_built += 1

    def _ready(self, epoch: int, start_step: int) -> None:
        """The training iterator, about to hand out (epoch, start_step)."""
        restore = self._take_resume(epoch, start_step)
        if restore:
            self._build_train(tuple(restore["origin"]), base64.b64decode(restore["dali"]), tuple(restore["position"]))
            if restore["position"][1] >= self.steps_per_epoch:  # saved after an epoch's last batch
                self._end_epoch()
        elif self._train is None or self._train_next != (epoch, start_step):
            self._build_train((epoch, start_step), None, (epoch, start_step))
        self._train_next = None  # unknown until this epoch runs to its end

    def _end_epoch(self) -> None:
        """Past the epoch's last batch: DALI's end of epoch, then the next epoch starts prefetching."""
        try:
            next(self._train)
            raise RuntimeError("the DALI training pipeline ran past the end of its epoch")  # a bug, not data
        except StopIteration:
            pass
        self._train.reset()

    def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._ready(epoch, start_step)
        for step in range(start_step, self.steps_per_epoch):
            try:
                out = next(self._train)[0]
            except (RuntimeError, StopIteration) as err:  # DALI decodes a few batches ahead
                self._train = None
                if isinstance(err, StopIteration):
                    raise RuntimeError(f"the DALI training pipeline ended at step {step} of {self.steps_per_epoch}")
                raise self._decode_failure(err, self._feeder.files(epoch, step, 4)) from None
            self._position, self._dali_state = [epoch, step + 1], None  # state() asks the iterator
            yield self._batch(out)
        self._dali_state = self._train.checkpoints()[0]  # before reset() moves it to the next epoch
        self._end_epoch()  # prefetching the next epoch overlaps the evaluation
        self._train_next = (epoch + 1, 0)

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, valid = sharding.rank_eval_indices(self.eval_size, self.rank, self.world)
        files = [self.val_items[i][0] for i in indices]
        if self._eval is not None and self._eval_clean:
            self._eval.reset()  # rewinds the reader; the pipeline and its buffers stay
        else:  # first pass, or the last one was left half way (reset() cannot rewind that)
            self._eval = None
            labels = [self.val_items[i][1] if ok else -1 for i, ok in zip(indices, valid)]
            pipe = _eval_pipeline(files, labels, self.image_size, self.resize_size, self.decode, self.layout,
                                  self.on_gpu, batch_size=self.eval_local_batch, seed=0, **self.common)
            self._eval = self._iterator(pipe, files[:3 * self.eval_local_batch], train=False)
            self.eval_pipelines_built += 1
        self._eval_clean = False
        count = -(-len(files) // self.eval_local_batch)
        yield from self._batches(self._eval, files, self.eval_local_batch, count)
        self._eval_clean = True

    def state(self) -> dict:
        """DALI's checkpoint after the last batch handed out, and the origin that maps it to (epoch, step)."""
        if self._train is None or self._position is None:
            return {}
        dali_state = self._dali_state or self._train.checkpoints()[0]
        return {"position": self._position, "world": self.world, "origin": list(self._feeder.origin),
                "dali": base64.b64encode(dali_state).decode()}  # JSON-safe

    def load_state(self, state: dict) -> None:
        if state and state.get("world") == self.world and "origin" in state:
            self._resume = state
        elif state and "origin" not in state:
            log.warning("data state written by an earlier version of the DALI pipeline: the epoch goes on with "
                        "fresh augmentation randomness")
        elif state:
            log.warning("data state saved at world size %s, now %s: the epoch's remaining samples are "
                        "re-split over the new ranks with fresh augmentation randomness", state.get("world"), self.world)
