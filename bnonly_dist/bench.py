"""`bnonly bench`: speed and memory of full training vs BN-only, plain and lean autograd, side by side.

Variants, one process, the same synthetic batch: all (mode=all), bn-plain (mode=bn,
plain autograd) and bn-lean (mode=bn, lean autograd), each in a fresh process. For
each: median step time,
images/s, FLOPs per step (and the fraction of the GPU's peak), bytes autograd saves for
backward (saved-tensor hooks), peak memory and the largest batch that fits (GPU). With
--data, the data pipeline alone (images/s of the configured source) tells whether
loading or compute bounds a step.
"""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.utils.flop_counter import FlopCounterMode

from bnonly_dist import data, models, modes
from bnonly_dist.config import Config
from bnonly_dist.data.layout import DataError
from bnonly_dist.dist import choose_device
from bnonly_dist.engines.base import Engine
from bnonly_dist.optim import make_optimizer
from bnonly_dist.plan import resolve

VARIANTS = {"all": ("all", False), "bn-plain": ("bn", False), "bn-lean": ("bn", True)}  # name -> (mode, lean)

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets, by device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0}


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


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


class Setup:
    """What every variant shares: device, numerics, input shape."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = choose_device(cfg.train.device, 0)
        self.plan = resolve(cfg, self.device)
        self.autocast, self.memory_format = self.plan.autocast, self.plan.memory_format
        arch = models.parse_arch(cfg.model.arch)
        self.size = 32 if arch.family == "cifar" else cfg.data.image_size
        self.classes = cfg.model.num_classes or (10 if arch.family == "cifar" else 1000)

    def batch(self, size: int):
        generator = torch.Generator().manual_seed(self.cfg.seed)
        images = torch.randn(size, 3, self.size, self.size, generator=generator)
        labels = torch.randint(0, self.classes, (size,), generator=generator)
        return images.to(self.device).contiguous(memory_format=self.memory_format), labels.to(self.device)

    def engine(self, variant: str) -> Engine:
        cfg = self.cfg
        mode, lean = VARIANTS[variant]
        model = models.build(cfg.model.arch, self.classes, cfg.seed, cfg.model.bn_init)
        masks = modes.apply(model, mode, cfg.seed)
        models.set_memory_options(model, lean, cfg.train.activation_checkpointing, self.plan.frozen_dtype)
        model.to(self.device, memory_format=self.memory_format)
        masks = {n: m.to(self.device) for n, m in masks.items()}
        engine = Engine(model, make_optimizer(model, masks, cfg.optim), masks, cfg.optim.weight_decay)
        if cfg.train.compile:
            engine.compile()
        return engine


def largest_batch(setup: Setup, variant: str, start: int, limit: int) -> int:
    """The largest batch (a multiple of 8) for which a training step of variant fits in GPU memory."""
    engine = setup.engine(variant)

    def fits(size: int) -> bool:
        try:
            engine.train_step(*setup.batch(size), setup.autocast)
            _sync(setup.device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            engine.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    good, bad = 0, start
    while bad <= limit and fits(bad):
        good, bad = bad, 2 * bad
    bad = min(bad, limit + 8)
    while bad - good > 8:
        middle = (good + bad) // 16 * 8
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def measure(cfg: Config, variant: str, steps: int, warmup: int, max_batch_limit: int) -> dict:
    """One variant, alone in its process: counts, FLOPs, saved activations, peak memory, median
    step time and (GPU) the largest batch."""
    setup = Setup(cfg)
    device = setup.device
    images, labels = setup.batch(cfg.data.batch_size)
    engine = setup.engine(variant)
    for _ in range(warmup):
        engine.train_step(images, labels, setup.autocast)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.train_step(images, labels, setup.autocast)
        _sync(device)
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    with FlopCounterMode(display=False) as counter:
        engine.train_step(images, labels, setup.autocast)
    model = engine.model
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved = saved_activation_bytes(model, images, labels, setup.autocast)
    result = {
        "variant": variant, "mode": VARIANTS[variant][0], "lean": VARIANTS[variant][1],
        "trainable_params": modes.trainable_count(model, engine.masks),
        "step_time_s": median, "images_per_s": len(labels) / median,
        "flops_per_step": counter.get_total_flops(), "achieved_tflops": counter.get_total_flops() / median / 1e12,
        "saved_activation_bytes": saved, "saved_activation_bytes_per_image": saved / len(labels),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grad_and_momentum_bytes": grad_bytes * (2 if cfg.optim.momentum > 0 else 1),
        "peak_memory_bytes": peak, "max_batch": None,
    }
    del engine, model
    if device.type == "cuda" and max_batch_limit:
        torch.cuda.empty_cache()
        result["max_batch"] = largest_batch(setup, variant, cfg.data.batch_size, max_batch_limit)
    return result


def pipeline_rate(cfg: Config, device: torch.device, steps: int, warmup: int) -> dict:
    """Images/s of the configured data source alone (this process as rank 0 of 1)."""
    try:
        source = data.build(cfg, 0, 1, device)
    except DataError as err:
        return {"source": cfg.data.name, "skipped": str(err)}
    batches = iter(source.train_epoch(0))
    count = 0
    for i, (images, _) in enumerate(batches):
        if i == warmup:
            _sync(device)
            start, count = time.perf_counter(), 0
        elif i > warmup:
            count += len(images)
        if i == warmup + steps:
            break
    _sync(device)
    if count == 0:
        return {"source": cfg.data.name, "skipped": f"an epoch has fewer than {warmup + steps + 1} batches"}
    decode = getattr(source, "decode", None)
    return {"source": cfg.data.name, "decode": decode, "threads": cfg.data.num_threads if decode else None,
            "images_per_s": count / (time.perf_counter() - start), "batches": steps}


def run(cfg: Config, steps: int = 10, warmup: int = 3, variants=tuple(VARIANTS), with_data: bool = False,
        max_batch_limit: int = 4096) -> dict:
    """Each variant in a fresh process, one after the other, as a training run holds one model
    per process: another variant's tensors would shape the allocator and caches (on the CPU,
    mode=all ran 35% faster after the BN-only variants had run in the same process) and
    share the GPU's memory."""
    results = []
    for variant in variants:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(measure, cfg, variant, steps, warmup, max_batch_limit).result())
    device = choose_device(cfg.train.device, 0)
    on_gpu = device.type == "cuda"
    setup = Setup(cfg)
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    report = {"arch": cfg.model.arch, "batch": cfg.data.batch_size, "image_size": setup.size, "device": str(device),
              "device_name": name, "threads": torch.get_num_threads(),
              "precision": setup.plan.precision,
              "channels_last": setup.memory_format == torch.channels_last,
              "activation_checkpointing": cfg.train.activation_checkpointing, "frozen_dtype": cfg.train.frozen_dtype,
              "steps": steps, "peak_tflops": peak_tflops(name) if on_gpu else None, "results": results}
    by_variant = {r["variant"]: r for r in results}
    if "all" in by_variant:
        base = by_variant["all"]
        report["over_all"] = {v: {"step_time": r["step_time_s"] / base["step_time_s"],
                                  "saved_activation_bytes": r["saved_activation_bytes"] / base["saved_activation_bytes"]}
                              for v, r in by_variant.items() if v != "all"}
    if with_data:
        report["data_pipeline"] = pipeline_rate(cfg, device, steps, warmup)
    return report


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def format_report(report: dict) -> str:
    lines = [f"{report['arch']} batch {report['batch']} {report['image_size']}px on {report['device_name']} "
             f"({report['threads']} threads, {report['precision']}, channels_last={report['channels_last']}, "
             f"activation checkpointing {report['activation_checkpointing'] or 'off'}, "
             f"frozen weights {report['frozen_dtype']})",
             f"{'variant':<10}{'trainable':>12}{'step ms':>10}{'img/s':>9}{'TFLOP/s':>9}{'saved act MiB':>15}"
             f"{'KiB/img':>9}{'peak MiB':>10}{'max batch':>10}"]
    for r in report["results"]:
        lines.append(f"{r['variant']:<10}{r['trainable_params']:>12,}{1000 * r['step_time_s']:>10.1f}"
                     f"{r['images_per_s']:>9.1f}{r['achieved_tflops']:>9.3f}{r['saved_activation_bytes'] / 2**20:>15.1f}"
                     f"{r['saved_activation_bytes_per_image'] / 2**10:>9.0f}{_mib(r['peak_memory_bytes']):>10}"
                     f"{r['max_batch'] if r['max_batch'] is not None else 'n/a':>10}")
    for variant, ratio in report.get("over_all", {}).items():
        lines.append(f"{variant}/all: step time {ratio['step_time']:.2f}x, "
                     f"saved activations {ratio['saved_activation_bytes']:.2f}x")
    if report["peak_tflops"]:
        best = max(r["achieved_tflops"] for r in report["results"])
        lines.append(f"peak bf16 {report['peak_tflops']:.0f} TFLOP/s; best variant reaches "
                     f"{100 * best / report['peak_tflops']:.1f}% of it")
    pipe = report.get("data_pipeline")
    if pipe and "skipped" in pipe:
        lines.append(f"data pipeline: skipped ({pipe['skipped']})")
    elif pipe:
        fastest = max(r["images_per_s"] for r in report["results"])
        bound = "loading" if pipe["images_per_s"] < fastest else "compute"
        how = f", {pipe['decode']} decode, {pipe['threads']} threads" if pipe["decode"] else ""
        lines.append(f"data pipeline alone ({pipe['source']}{how}): {pipe['images_per_s']:.1f} img/s; "
                     f"the fastest variant trains {fastest:.1f} img/s, so {bound} bounds a step")
    return "\n".join(lines)
