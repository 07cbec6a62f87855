"""BN groups keep the device busy: no training step turns a tensor into a Python number (on
a GPU, a wait for the device) outside log steps.

Every conversion a step makes through Python is counted (Tensor.item, tolist, numpy,
__float__, __int__, __bool__, __index__): the loop converts only on log steps, so a BN
group that does (as `float(total)` did in every synchronised BN forward) fails here. On a
GPU, tests/test_bn_groups.py's cuda tests refuse any device-to-host wait of a BN layer
(torch.cuda.set_sync_debug_mode).
"""
import contextlib
import os

import pytest
import torch
import torch.multiprocessing as mp
from launch import free_port

from bnonly_dist import config

CONVERSIONS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def counted_conversions():
    """Inside: every Tensor-to-Python conversion is recorded (name and the tensor's shape) in the yielded list."""
    calls, own = [], {name: name in vars(torch.Tensor) for name in CONVERSIONS}
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counting(name, original):
        def convert(self, *args, **kwargs):
            calls.append((name, tuple(self.shape)))
            return original(self, *args, **kwargs)
        return convert

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            if own[name]:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


def test_the_counter_sees_conversions():
    with counted_conversions() as calls:
        x = torch.ones(2)
        float(x[0]), bool(x[1]), x.tolist(), x.sum().item(), int(x[0])
        torch.relu(x)  # not a conversion
    assert [name for name, _ in calls] == ["__float__", "__bool__", "tolist", "item", "__int__"]
    assert float(torch.ones(())) == 1.0 and "__float__" not in vars(torch.Tensor)  # put back as it was


def _steps_convert_nothing(rank, world, port, cifar_root, tmp):
    """Every rank: runs of 16 images per rank whose BN groups are ghost (8 images, 2 per rank) or synchronised
    (32 images, both ranks), plain and lean autograd; three training steps each, counted."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from tqdm import tqdm

    from bnonly_dist import dist
    from bnonly_dist.run.train import Run
    try:
        for bn_batch, grouping in ((8, "2 groups per rank"), (32, "synchronised over 2 ranks")):
            for lean in ("false", "true"):
                cfg = config.load("configs/cifar10_resnet14.yaml", [
                    f"data.root={cifar_root}", "data.batch_size=32", f"train.bn_batch={bn_batch}", "train.device=cpu",
                    "model.arch=cifar_resnet_8", f"train.lean_autograd={lean}", "train.log_every=100",
                    "train.progress=lines", "dist.timeout_s=60"])
                run = Run(cfg, tmp / f"bn{bn_batch}-lean-{lean}")
                try:
                    assert grouping in run.plan.describe()
                    run.bar = tqdm(disable=True)  # as Run.train sets it up where no bar is shown
                    batches = iter(run.source.train_epoch(0, 0))
                    for _ in range(3):
                        batch = next(batches)
                        with counted_conversions() as calls:
                            run.train_step(*batch)
                        assert calls == [], f"bn_batch={bn_batch}, lean {lean}: a training step converted {calls}"
                    with counted_conversions() as calls:
                        run.log_train()  # a log step does convert (what the loop waits for there)
                    assert calls
                finally:
                    run.close()
    finally:
        dist.teardown()


def test_ghost_and_synchronised_training_steps_convert_no_tensor_to_a_number(cifar_root, tmp_path):
    """2 gloo ranks, the real loop's step (data to the device, forward, backward, SGD, the meter)."""
    mp.spawn(_steps_convert_nothing, args=(2, free_port(), cifar_root, tmp_path), nprocs=2)
