"""`bnonly bench`: training-step speed and memory of mode=all vs mode=bn, one process, same batch."""
from __future__ import annotations

import contextlib
import functools
import time

import torch

from bnonly_dist import models, modes
from bnonly_dist.config import Config
from bnonly_dist.dist import choose_device
from bnonly_dist.engines.base import Engine
from bnonly_dist.optim import make_optimizer
from bnonly_dist.train import numerics


def saved_activation_bytes(model: torch.nn.Module, images, labels, autocast) -> int:
    """Bytes autograd keeps for backward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
    del loss
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_mode(cfg: Config, mode: str, num_classes: int, images, labels, device, autocast, memory_format,
               steps: int, warmup: int) -> dict:
    model = models.build(cfg.model.arch, num_classes, cfg.seed, cfg.model.bn_init)
    masks = modes.apply(model, mode, cfg.seed)
    model.to(device, memory_format=memory_format)
    masks = {n: m.to(device) for n, m in masks.items()}
    optimizer = make_optimizer(model, masks, cfg.optim)
    engine = Engine(model, optimizer, masks, cfg.optim.weight_decay)
    if cfg.train.compile:
        engine.compile()
    step = functools.partial(engine.train_step, images, labels, autocast)
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    momentum_bytes = grad_bytes if optimizer is not None and cfg.optim.momentum > 0 else 0
    return {
        "mode": mode,
        "trainable_params": modes.trainable_count(model, masks),
        "step_time_s": median,
        "images_per_s": len(labels) / median,
        "saved_activation_bytes": saved_activation_bytes(model, images, labels, autocast),
        "param_bytes": state_bytes,
        "grad_and_momentum_bytes": grad_bytes + momentum_bytes,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def run(cfg: Config, steps: int = 10, warmup: int = 3, modes_to_run=("all", "bn")) -> dict:
    device = choose_device(cfg.train.device, 0)
    torch.manual_seed(cfg.seed)
    arch = models.parse_arch(cfg.model.arch)
    size = 32 if arch.family == "cifar" else cfg.data.image_size
    classes = cfg.model.num_classes or (10 if arch.family == "cifar" else 1000)
    on_gpu = device.type == "cuda"
    autocast, memory_format = numerics(cfg, device)
    batch = cfg.data.batch_size
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, classes, (batch,), device=device)
    results = [bench_mode(cfg, mode, classes, images, labels, device, autocast, memory_format, steps, warmup)
               for mode in modes_to_run]
    by_mode = {r["mode"]: r for r in results}
    report = {"arch": cfg.model.arch, "batch": batch, "image_size": size, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
              "threads": torch.get_num_threads(),
              "precision": "fp32" if autocast is contextlib.nullcontext else "bf16",
              "channels_last": memory_format == torch.channels_last, "steps": steps, "results": results}
    if "all" in by_mode and "bn" in by_mode:
        report["bn_over_all"] = {
            "step_time": by_mode["bn"]["step_time_s"] / by_mode["all"]["step_time_s"],
            "saved_activation_bytes": by_mode["bn"]["saved_activation_bytes"] / by_mode["all"]["saved_activation_bytes"],
        }
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['arch']} batch {report['batch']} {report['image_size']}px on {report['device_name']} "
             f"({report['threads']} threads, {report['precision']}, channels_last={report['channels_last']})",
             f"{'mode':<8}{'trainable':>12}{'step ms':>10}{'img/s':>10}{'saved act MiB':>15}{'peak MiB':>10}"]
    for r in report["results"]:
        peak = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] is not None else "n/a"
        lines.append(f"{r['mode']:<8}{r['trainable_params']:>12,}{1000 * r['step_time_s']:>10.1f}"
                     f"{r['images_per_s']:>10.1f}{r['saved_activation_bytes'] / 2**20:>15.1f}{peak:>10}")
    if "bn_over_all" in report:
        ratio = report["bn_over_all"]
        lines.append(f"bn/all: step time {ratio['step_time']:.2f}x, saved activations {ratio['saved_activation_bytes']:.2f}x")
    return "\n".join(lines)
