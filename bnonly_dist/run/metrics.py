"""Metrics out: metrics.jsonl and TensorBoard events, written by rank 0."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch

from bnonly_dist.run.bn_stats import bn_affine
from bnonly_dist.run.paths import RunPaths


def _writer_thread_errors(previous):
    """threading.excepthook: TensorBoard's writer thread failing to write (a full disk) is one line, said once, not a
    traceback; the run goes on and its own writes report the disk (cli.py)."""
    said = []

    def hook(args) -> None:
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            previous(args)
        elif not said:
            said.append(True)
            sys.stderr.write(f"bnonly: warning: cannot write TensorBoard events ({args.exc_value.strerror or args.exc_value}); "
                             "they are dropped from now on\n")
    return hook


class Metrics:
    """Rank 0 writes metrics.jsonl and TensorBoard events; every rank logs text."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            if threading.excepthook is threading.__excepthook__:  # once per process
                threading.excepthook = _writer_thread_errors(threading.excepthook)
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
