"""Exact top-1/top-5 over a sharded validation set: sums of correct and total, all-reduced."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from bnonly_dist import dist


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, autocast=contextlib.nullcontext,
             memory_format=torch.contiguous_format, num_classes: int | None = None) -> dict:
    """Labels of -1 mark padding and are not counted. Returns top1, top5 (%), loss, count, and with
    num_classes also per_class_top1 (%, one per class; NaN where a class has no image)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, count
    per_class = torch.zeros(2, num_classes or 0, dtype=torch.float64, device=device)  # correct, images
    for images, labels in batches:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images).float()
        # Padding (-1) is left out by sums, not by boolean indexing, whose output size the
        # host would have to wait for: no GPU sync until the one .tolist() at the end.
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]  # never true for -1
        valid = labels >= 0
        sums += torch.stack([hits[:, :1].sum(), hits.sum(), F.cross_entropy(logits, labels, ignore_index=-1,
                                                                             reduction="sum"),
                             valid.sum()]).double()
        if num_classes:  # padding adds 0 to class 0
            per_class[0].index_add_(0, labels.clamp(min=0), (hits[:, 0] & valid).double())
            per_class[1].index_add_(0, labels.clamp(min=0), valid.double())
    model.train(was_training)
    top1, top5, loss, count = dist.all_reduce_sum(sums).tolist()  # collective; the one GPU sync
    count = int(count)
    result = {"top1": 100 * top1 / max(1, count), "top5": 100 * top5 / max(1, count),
              "loss": loss / max(1, count), "count": count}
    if num_classes:
        correct, images = dist.all_reduce_sum(per_class).tolist()  # collective
        result["per_class_top1"] = [100 * c / n if n else float("nan") for c, n in zip(correct, images)]
    return result
