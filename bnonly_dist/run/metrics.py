"""Metrics out: metrics.jsonl and TensorBoard events, written by rank 0."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bnonly_dist.logsafe import quiet_writer_threads
from bnonly_dist.run.bn_stats import bn_affine
from bnonly_dist.run.paths import RunPaths


class Metrics:
    """Rank 0 writes metrics.jsonl and TensorBoard events; every rank logs text."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            quiet_writer_threads()  # a full disk: the run's one line, not the writer thread's traceback
            paths = RunPaths(run_dir)
            self.writer = SummaryWriter(str(paths.tb))
            self.jsonl = open(paths.metrics, "a")

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
