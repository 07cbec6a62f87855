"""DDP keeps each rank's BN buffers its own in forward, without a deprecation warning on every rank."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, sys, warnings
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from bnonly_dist.engines.ddp import NO_FORWARD_BUFFER_SYNC
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a FutureWarning here would be printed by every rank of a run
    net = DistributedDataParallel(model, **NO_FORWARD_BUFFER_SYNC)
assert getattr(net, "forward_sync_buffers", getattr(net, "broadcast_buffers", None)) is False
net(torch.randn(2, 3, 8, 8)).sum().backward()
dist.destroy_process_group()
print("ok")
"""


def test_ddp_is_built_without_a_buffer_broadcast_in_forward_and_without_a_warning(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert "Warning" not in out.stderr, out.stderr
