"""Metrics out: metrics.jsonl and TensorBoard on rank 0, console/progress, gamma statistics."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bnonly_dist.logsafe import SafeFileHandler, SafeStreamHandler
from bnonly_dist.models import parameter_roles

log = logging.getLogger("bnonly")


def bn_stage(name: str) -> str:
    """'layer2.3.bn1.weight' -> 'layer2'; the stem's BN -> 'stem'."""
    head = name.split(".", 1)[0]
    return head if head.startswith("layer") else "stem"


def bn_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BN affine parameters of an unsharded model by name (see Engine.bn_parameters)."""
    roles = parameter_roles(model)
    return {name: param for name, param in model.named_parameters() if roles[name] == "bn"}


def bn_affine(bn_params: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{stage: {'gamma': all gammas of the stage, 'beta': ...}} as flat float32 CPU tensors."""
    stages: dict[str, dict[str, list]] = {}
    for name, param in bn_params.items():
        kind = "gamma" if name.endswith("weight") else "beta"
        stages.setdefault(bn_stage(name), {"gamma": [], "beta": []})[kind].append(param.detach().float().cpu().view(-1))
    return {stage: {k: torch.cat(v) for k, v in parts.items()} for stage, parts in stages.items()}


def gamma_stats(bn_params: dict[str, torch.Tensor], threshold: float) -> dict[str, float]:
    """Fraction of channels with |gamma| < threshold, overall and per stage, and mean |gamma|."""
    affine = bn_affine(bn_params)
    stats = {}
    for stage, parts in affine.items():
        stats[f"gamma_small_frac/{stage}"] = (parts["gamma"].abs() < threshold).float().mean().item()
    gammas = torch.cat([parts["gamma"] for parts in affine.values()])
    stats["gamma_small_frac"] = (gammas.abs() < threshold).float().mean().item()
    stats["gamma_abs_mean"] = gammas.abs().mean().item()
    return stats


class StepMeter:
    """Averages over the steps since the last report: loss, batch top-1, speed, data wait."""

    def __init__(self, device: torch.device, images_per_step: int):
        self.device, self.images_per_step = device, images_per_step
        self.reset()

    def reset(self) -> None:
        # Sums stay on the device so that a step never waits for the GPU.
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.steps, self.wait, self.start = 0, 0.0, time.perf_counter()

    def next_batch(self, batches):
        """The next batch (None at the end of the epoch), timing the wait for it."""
        tick = time.perf_counter()
        batch = next(batches, None)
        self.wait += time.perf_counter() - tick
        return batch

    def add(self, loss: torch.Tensor, batch_top1: torch.Tensor) -> None:
        self.loss += loss
        self.correct += batch_top1
        self.steps += 1

    def report(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        values = {"loss": self.loss.item() / self.steps, "top1": 100 * self.correct.item() / self.steps,
                  "images_per_s": self.steps * self.images_per_step / elapsed, "data_wait_frac": self.wait / elapsed}
        self.reset()
        return values


class Metrics:
    """Rank 0 writes metrics.jsonl and TensorBoard events; every rank logs text."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tb"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def histograms(self, step: int, bn_params: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        for stage, parts in bn_affine(bn_params).items():
            for kind, values in parts.items():
                self.writer.add_histogram(f"{kind}/{stage}", values, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def setup_logging(run_dir: Path, rank: int) -> None:
    """Console on rank 0, and a text log per rank in RUN/logs/."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [SafeFileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(SafeStreamHandler(sys.stdout))
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
