"""ImageNet class folders read and augmented by NVIDIA DALI.

Train: RandomResizedCrop(size, scale=(min_area, 1), ratio=(0.8, 1.25)) fused into the
JPEG decode, then flip. Eval: resize shorter side to resize_size, centre crop size.
Decode runs on 'cpu', or 'mixed' (nvJPEG on the GPU). With decode=cpu on a GPU run the
decoded crops move to the GPU inside DALI (its pinned staging, its stream) and resize and
normalize run there, so no pageable host batch is copied by the loop. Under channels_last
DALI writes HWC and the batch is a channels_last view of it: no layout copy per batch.

Each epoch builds a training pipeline over this rank's files in the order data/sharding.py
gives (readers.file fixes its file list when built, and that order is what keeps resume
and resharding exact); the evaluation pipeline is built once and reset between passes.
DALI's own checkpoint carries the random state of the augmentations for an exact resume
at the same world size.
"""
from __future__ import annotations

import base64
import logging
from typing import Iterator

import torch

from bnonly_dist.data import sharding
from bnonly_dist.data.layout import DataError, find_corrupt, imagenet_index
from bnonly_dist.models.init import name_seed

log = logging.getLogger(__name__)
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


def _train_pipeline(files, labels, size, min_area, decode, layout, on_gpu, **kwargs):
    dali, _, _ = _dali()
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
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


class DaliImageNetSource:
    def __init__(self, root: str, global_batch: int, eval_batch: int, rank: int, world: int, seed: int,
                 device: torch.device, decode: str, num_threads: int, image_size: int, resize_size: int,
                 min_area: float, channels_last: bool = False):
        self.classes, self.train_items, self.val_items = imagenet_index(root)
        self.num_classes = len(self.classes)
        self.rank, self.world, self.seed, self.device = rank, world, seed, device
        self.global_batch = global_batch
        self.local_batch = sharding.per_rank(global_batch, world)
        self.eval_local_batch = max(1, eval_batch // world)
        self.steps_per_epoch = sharding.steps_per_epoch(len(self.train_items), global_batch)
        self.eval_size = len(self.val_items)
        self.decode = decode
        self.on_gpu = device.type == "cuda"
        self.channels_last = channels_last
        self.layout = "HWC" if channels_last else "CHW"
        self.common = dict(num_threads=num_threads, device_id=device.index if self.on_gpu else None,
                           prefetch_queue_depth=2)
        self.image_size, self.resize_size, self.min_area = image_size, resize_size, min_area
        self._train_iterator = None
        self._position = None  # (epoch, step) of the next batch
        self._resume = None  # a saved state to restore at the next train_epoch
        self._eval = None  # the evaluation iterator, built at the first pass
        self._eval_clean = False  # the last evaluation pass ran to its end, so reset() may rewind it
        self.eval_pipelines_built = 0

    @staticmethod
    def _decode_failure(err: RuntimeError, files: list[str]) -> DataError:
        bad = find_corrupt(files)
        where = f"corrupt image {bad[0]}" if bad else f"DALI failed ({str(err).splitlines()[0]})"
        return DataError(f"{where}; delete or replace it (`bnonly data check DIR --decode` lists all)")

    def _iterator(self, pipe, files: list[str], local_batch: int, train: bool):
        """The DALI iterator over a built pipe; a decode failure becomes a DataError naming the file."""
        _, iterator_cls, last_batch = _dali()
        try:  # the iterator decodes its first batches as it is built
            pipe.build()
            return iterator_cls([pipe], ["images", "labels"], reader_name="Reader", auto_reset=False,
                                last_batch_policy=last_batch.DROP if train else last_batch.PARTIAL)
        except RuntimeError as err:
            raise self._decode_failure(err, files[:3 * local_batch]) from None

    def _batches(self, iterator, files: list[str], local_batch: int, count: int):
        """Yield up to count batches in the model's layout (HWC becomes a channels_last view)."""
        for i in range(count):
            try:
                out = next(iterator)[0]
            except StopIteration:
                return
            except RuntimeError as err:  # DALI decodes a few batches ahead
                raise self._decode_failure(err, files[i * local_batch:(i + 4) * local_batch]) from None
            images = out["images"].permute(0, 3, 1, 2) if self.channels_last else out["images"]
            yield images, out["labels"].view(-1).long()

    def _take_resume(self, epoch: int, start_step: int) -> dict | None:
        saved, self._resume = self._resume, None
        if saved and saved["position"] != [epoch, start_step]:
            log.warning("data state saved at %s, resuming at %s: augmentations draw fresh random numbers",
                        saved["position"], [epoch, start_step])
            return None
        return saved

    def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        restore = self._take_resume(epoch, start_step)
        # A restored DALI checkpoint holds its own position in the whole epoch's list;
        # a fresh pipeline starts its list at start_step.
        first = 0 if restore else start_step
        perm = sharding.epoch_permutation(len(self.train_items), self.seed, epoch)
        indices = sharding.rank_train_indices(perm, self.global_batch, self.rank, self.world, first)
        files = [self.train_items[i][0] for i in indices]
        labels = [self.train_items[i][1] for i in indices]
        pipe = _train_pipeline(files, labels, self.image_size, self.min_area, self.decode, self.layout, self.on_gpu,
                               batch_size=self.local_batch,
                               seed=name_seed(self.seed, f"dali/{epoch}/{self.rank}") % 2**31,
                               checkpoint=base64.b64decode(restore["dali"]) if restore else None, **self.common)
        ahead = files[(start_step - first) * self.local_batch:]
        self._train_iterator = None  # the previous epoch's pipeline goes before this one is built
        self._train_iterator = self._iterator(pipe, ahead, self.local_batch, train=True)  # state() reads it
        batches = self._batches(self._train_iterator, ahead, self.local_batch, self.steps_per_epoch - start_step)
        for step, batch in enumerate(batches, start_step):
            self._position = [epoch, step + 1]
            yield batch
        self._train_iterator = None

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
            self._eval = self._iterator(pipe, files, self.eval_local_batch, train=False)
            self.eval_pipelines_built += 1
        self._eval_clean = False
        count = -(-len(files) // self.eval_local_batch)
        yield from self._batches(self._eval, files, self.eval_local_batch, count)
        self._eval_clean = True

    def state(self) -> dict:
        """The DALI checkpoint after the last batch handed out (per rank)."""
        if self._train_iterator is None or self._position is None:
            return {}
        dali_state = base64.b64encode(self._train_iterator.checkpoints()[0]).decode()  # JSON-safe
        return {"position": self._position, "world": self.world, "dali": dali_state}

    def load_state(self, state: dict) -> None:
        if state and state.get("world") == self.world:
            self._resume = state
        elif state:
            log.warning("data state saved at world size %s, now %s: the epoch's remaining samples are "
                        "re-split over the new ranks with fresh augmentation randomness", state.get("world"), self.world)
