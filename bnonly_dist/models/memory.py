"""What a training step keeps for backward, and what memory a rank has: the inputs of
train.lean_autograd=auto (config/plan.py, which its callers hand this module: the plan sits
on the ground floor and imports nothing of the models).

The estimate runs the network's forward on the meta device (shapes only: no memory, no
compute; 0.1-0.4 s for ResNet-50 to ResNet-200) under saved-tensor hooks, counting each
kept storage once with the very counter `bnonly bench` uses on real ones (saved_storages).
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from bnonly_dist import models, modes
from bnonly_dist.config.catalog import parse_arch
from bnonly_dist.rendezvous import ranks_on_this_host


@contextlib.contextmanager
def saved_storages(model: torch.nn.Module, label=lambda: None):
    """Every storage autograd saves for backward inside the block, once, parameters excluded:
    {storage: (bytes, label() when first saved)}. Works on real and on meta tensors."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, tuple[int, object]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params and storage._cdata not in kept:
            kept[storage._cdata] = (storage.nbytes(), label())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield kept


@functools.lru_cache(maxsize=64)  # a sweep's preflight asks once per point, mostly the same question
def plain_saved_bytes(arch: str, classes: int, mode: str, batch: int, image_size: int, channels_last: bool,
                      checkpointed_stages: tuple[int, ...] = (), bf16: bool = False) -> int:
    """Bytes plain autograd holds for backward at its peak in one step of `batch` images (one rank).

    A checkpointed stage holds its segments' inputs, and during backward one segment's
    saved tensors while it is recomputed: the largest segment is counted. Counted in fp32;
    under bf16 autocast the kept activations are bf16, so about half (int64 max-pool
    positions and autocast's bf16 weight copies make it 1-2 % more)."""
    model = models.create(arch, classes, device="meta")
    modes.apply(model, mode, seed=0)  # requires_grad per mode: what autograd keeps depends on it
    models.set_memory_options(model, False)  # counted without checkpointing, segment by segment
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    segment_of, firsts = {}, set()  # block -> its segment (stage, k); the first block of each segment
    for number, stage in enumerate(model.stages(), 1):
        for k, segment in enumerate(stage.segments() if number in checkpointed_stages else []):
            segment_of.update((block, (number, k)) for block in segment)
            firsts.add(segment[0])
    inputs: dict[object, int] = {}  # segment -> bytes of its input, which checkpointing keeps
    running = [None]

    def enter(block, args):
        running[0] = segment_of[block]
        if block in firsts:
            inputs[running[0]] = args[0].untyped_storage().nbytes()

    def leave(block, args, out):
        running[0] = None

    for block in segment_of:
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)

    side = 32 if parse_arch(arch).family == "cifar" else image_size
    images = torch.empty(batch, 3, side, side, device="meta")
    labels = torch.empty(batch, dtype=torch.long, device="meta")
    with saved_storages(model, label=lambda: running[0]) as kept:  # storage -> (bytes, segment or None)
        torch.nn.functional.cross_entropy(model(images), labels)
    per_segment: dict[object, int] = {}
    for size, segment in kept.values():
        per_segment[segment] = per_segment.get(segment, 0) + size
    outside = per_segment.pop(None, 0)
    total = outside + sum(inputs.values()) + max(per_segment.values(), default=0)
    return total // (2 if bf16 else 1)


def _cgroup_limit() -> int | None:
    """This process's cgroup memory limit (v2 memory.max or v1 limit_in_bytes), None if unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def rank_memory_bytes(device: torch.device) -> int | None:
    """Memory one rank may use: its GPU's, or this host's RAM (or its cgroup's limit, if
    lower) shared by the ranks on it; None where it cannot be read (no GPU visible where
    the plan asks for one)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(device).total_memory
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(host, _cgroup_limit() or host) // ranks_on_this_host()
