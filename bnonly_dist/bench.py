"""`bnonly bench`: speed and memory of full training vs BN-only, plain and lean autograd, side by side.

Variants, one process, the same synthetic batch: all (mode=all), bn-plain (mode=bn,
plain autograd) and bn-lean (mode=bn, lean autograd). For each: median step time (the
variants take turns step by step),
images/s, FLOPs per step (and the fraction of the GPU's peak), bytes autograd saves for
backward (saved-tensor hooks), peak memory and the largest batch that fits (GPU). With
--data, the data pipeline alone (images/s of the configured source) tells whether
loading or compute bounds a step.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bnonly_dist import data, models, modes
from bnonly_dist.config import Config
from bnonly_dist.data.layout import DataError
from bnonly_dist.dist import choose_device
from bnonly_dist.engines.base import Engine
from bnonly_dist.optim import make_optimizer
from bnonly_dist.train import frozen_dtype, numerics

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
        self.autocast, self.memory_format = numerics(cfg, self.device)
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
        models.set_memory_options(model, lean, cfg.train.activation_checkpointing, frozen_dtype(cfg, self.autocast))
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


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def profile_variant(setup: Setup, variant: str, engine: Engine, images, labels, baseline: int) -> dict:
    """Everything but the timing: counts, FLOPs, saved activations, peak memory of one step."""
    cfg, device = setup.cfg, setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with FlopCounterMode(display=False) as counter:
        engine.train_step(images, labels, setup.autocast)
    _sync(device)
    # The variants built before this one stay resident for the interleaved timing: not counted.
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    model = engine.model
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved = saved_activation_bytes(model, images, labels, setup.autocast)
    return {
        "variant": variant, "mode": VARIANTS[variant][0], "lean": VARIANTS[variant][1],
        "trainable_params": modes.trainable_count(model, engine.masks), "flops_per_step": counter.get_total_flops(),
        "saved_activation_bytes": saved, "saved_activation_bytes_per_image": saved / len(labels),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grad_and_momentum_bytes": grad_bytes * (2 if cfg.optim.momentum > 0 else 1),
        "peak_memory_bytes": peak, "max_batch": None,
    }


def time_interleaved(setup: Setup, engines: dict, images, labels, steps: int) -> dict[str, float]:
    """Median step time per variant; the variants take turns so that drift in the machine's
    speed (other load, clocks) hits them alike."""
    times = {variant: [] for variant in engines}
    for _ in range(steps):
        for variant, engine in engines.items():
            start = time.perf_counter()
            engine.train_step(images, labels, setup.autocast)
            _sync(setup.device)
            times[variant].append(time.perf_counter() - start)
    return {variant: sorted(t)[len(t) // 2] for variant, t in times.items()}


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
    torch.manual_seed(cfg.seed)
    setup = Setup(cfg)
    device = setup.device
    on_gpu = device.type == "cuda"
    images, labels = setup.batch(cfg.data.batch_size)
    engines, results = {}, []
    for variant in variants:
        baseline = _allocated(device)
        engines[variant] = engine = setup.engine(variant)
        for _ in range(warmup):
            engine.train_step(images, labels, setup.autocast)
        results.append(profile_variant(setup, variant, engine, images, labels, baseline))
    medians = time_interleaved(setup, engines, images, labels, steps)
    engines.clear()
    for result in results:
        median = medians[result["variant"]]
        result.update(step_time_s=median, images_per_s=len(labels) / median,
                      achieved_tflops=result["flops_per_step"] / median / 1e12)
        if on_gpu and max_batch_limit:
            result["max_batch"] = largest_batch(setup, result["variant"], cfg.data.batch_size, max_batch_limit)
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    report = {"arch": cfg.model.arch, "batch": cfg.data.batch_size, "image_size": setup.size, "device": str(device),
              "device_name": name, "threads": torch.get_num_threads(),
              "precision": "fp32" if setup.autocast is contextlib.nullcontext else "bf16",
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
