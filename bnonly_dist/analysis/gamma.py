"""What BN-only training does to gamma: per-layer distributions, the fraction of channels it
switches off (|gamma| < threshold), and the ablation that zeroes those channels."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from bnonly_dist import data, network
from bnonly_dist.analysis.runs import RunRecord
from bnonly_dist.config import plan as plans
from bnonly_dist.config.catalog import ENGINES
from bnonly_dist.engines.base import Engine
from bnonly_dist.models import memory
from bnonly_dist.run import checkpoint
from bnonly_dist.run.bn_stats import bn_parameters
from bnonly_dist.run.evaluate import evaluate

log = logging.getLogger(__name__)


@dataclass
class GammaReport:
    layers: dict[str, torch.Tensor]  # BN layer name -> its gammas
    betas: dict[str, torch.Tensor]
    small_frac: float  # over all channels
    small_frac_per_layer: dict[str, float]
    top1: float | None = None  # evaluated here, as loaded
    ablated_top1: float | None = None  # small-|gamma| channels zeroed
    ablated_channels: int = 0


def analysis_plan(record: RunRecord, device: torch.device):
    """The run's config and plan for reading it back: fp32 and NCHW whatever it trained in."""
    train = record.cfg.train.model_copy(update={"precision": "fp32", "frozen_dtype": "fp32", "channels_last": False})
    cfg = record.cfg.model_copy(update={"train": train})
    return cfg, plans.resolve(cfg, device, memory=memory)


def load_model(record: RunRecord, device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """The run's final model: frozen weights from the seed, the rest from its newest good checkpoint."""
    cfg, plan = analysis_plan(record, device)
    net = network.build(cfg, plan, record.num_classes)
    model = net.model
    path = checkpoint.latest_good(record.run_dir)  # verified; a damaged newer one is skipped, not moved
    if path is None:
        raise checkpoint.CheckpointError(f"{record.run_dir} has no good checkpoint to read gammas from")
    engine = checkpoint.read_commit(path)["engine"]
    if engine in ENGINES and not ENGINES[engine].dcp:
        readable = "/".join(name for name, e in ENGINES.items() if e.dcp)
        raise checkpoint.CheckpointError(f"{path} is a {engine} checkpoint; analysis reads {readable} (DCP) ones")
    checkpoint.load(path, Engine(model, None, {}, 0.0), 0, 1, net.frozen_sha)
    return model.eval()


@torch.no_grad()
def zero_small_channels(model: torch.nn.Module, threshold: float) -> int:
    """Set gamma and beta to 0 where |gamma| < threshold: the channel's output becomes 0."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            off = module.weight.abs() < threshold
            module.weight[off] = 0
            module.bias[off] = 0
            count += int(off.sum())
    return count


def analyze(record: RunRecord, threshold: float, ablate: bool, device: torch.device) -> GammaReport:
    model = load_model(record, device)
    params = bn_parameters(model)
    layers = {n.removesuffix(".weight"): p.detach().clone() for n, p in params.items() if n.endswith(".weight")}
    betas = {n.removesuffix(".bias"): p.detach().clone() for n, p in params.items() if n.endswith(".bias")}
    every = torch.cat([g for g in layers.values()])
    report = GammaReport(layers, betas, (every.abs() < threshold).float().mean().item(),
                         {n: (g.abs() < threshold).float().mean().item() for n, g in layers.items()})
    if ablate:
        cfg, plan = analysis_plan(record, device)
        source = data.build(cfg, plan, 0, 1)
        report.top1 = evaluate(model, source.eval_batches(), device)["top1"]
        report.ablated_channels = zero_small_channels(model, threshold)
        report.ablated_top1 = evaluate(model, source.eval_batches(), device)["top1"]
    return report
