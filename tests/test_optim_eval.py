import math

import pytest
import torch

from bnonly_dist.config import OptimConfig
from bnonly_dist.run.evaluate import evaluate
from bnonly_dist.engines.optim import lr_at


def test_step_schedule_with_warmup():
    optim = OptimConfig(lr=0.4, epochs=90, milestones=[30, 60, 80], warmup_epochs=5)
    spe = 10
    assert lr_at(0, spe, optim) == pytest.approx(0.4 / 50)
    assert lr_at(49, spe, optim) == pytest.approx(0.4)
    assert lr_at(299, spe, optim) == pytest.approx(0.4)
    assert lr_at(300, spe, optim) == pytest.approx(0.04)
    assert lr_at(600, spe, optim) == pytest.approx(0.004)
    assert lr_at(899, spe, optim) == pytest.approx(0.0004)


def test_cosine_schedule():
    optim = OptimConfig(lr=0.1, epochs=10, schedule="cosine", warmup_epochs=0)
    assert lr_at(0, 100, optim) == pytest.approx(0.1)
    assert lr_at(500, 100, optim) == pytest.approx(0.05)
    assert lr_at(999, 100, optim) == pytest.approx(0.05 * (1 + math.cos(math.pi * 999 / 1000)))


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, index):
        return self.logits[index.long().view(-1)]


def test_evaluate_counts_top1_top5_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(23, 10)
    labels = torch.randint(0, 10, (23,))
    batches = [(torch.arange(i, min(i + 5, 23)), labels[i:i + 5]) for i in range(0, 23, 5)]
    batches.append((torch.tensor([0, 1]), torch.tensor([-1, -1])))  # padding from sharding
    result = evaluate(FixedLogits(logits), batches, torch.device("cpu"))
    top5 = logits.topk(5, 1).indices
    assert result["count"] == 23
    assert result["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert result["top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
