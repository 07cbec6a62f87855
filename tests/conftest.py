import pytest

from bnonly_dist import config
from bnonly_dist.data import fake


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    fake.write_cifar10(root, train_size=320, test_size=103)
    return root


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    fake.write_imagenet(root, num_classes=4, train_per_class=8, val_per_class=5)
    return root


@pytest.fixture
def tiny_cfg(cifar_root):
    """A BN-only CIFAR run of a few steps (config overrides may be added)."""
    def make(*overrides):
        return config.load("configs/cifar10_resnet14.yaml", [
            f"data.root={cifar_root}", "data.batch_size=32", "train.bn_batch=32", "data.eval_batch_size=50", "optim.epochs=2",
            "optim.milestones=[1]", "train.device=cpu", "train.deterministic=true", "train.log_every=2",
            "train.checkpoint_every=4", "train.progress=lines", *overrides])
    return make


@pytest.fixture(autouse=True)
def launcher_environment_untouched():
    """Whatever a test does in-process (dist.init writes RANK, MASTER_ADDR, ...), the next test and
    the processes it starts see the launcher variables as they were."""
    import os
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def root_logger_untouched():
    """A command run in-process (cli.main: logs.setup, analyze's basicConfig) may give the root logger a
    handler on this test's captured stderr, closed once the test ends: the next test must not log into it."""
    import logging
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


class PrefetchingSource:
    """A data source of `batches` batches of 4 tiny images per epoch, prefetch_depth of them ready before the
    clock starts (what perf/bench.pipeline_rate must not count)."""
    prefetch_depth, decode = 2, "cpu"

    def __init__(self, batches: int):
        self.batches = batches

    def train_epoch(self, epoch):
        import torch
        for _ in range(self.batches):
            yield torch.zeros(4, 3, 8, 8), torch.zeros(4)


@pytest.fixture
def source_of(monkeypatch):
    """source_of(n): perf/bench builds a PrefetchingSource of n batches per epoch instead of the config's data."""
    from bnonly_dist.perf import bench

    def use(batches: int) -> None:
        monkeypatch.setattr(bench.data, "build", lambda *a: PrefetchingSource(batches))
    return use
