"""`bnonly bench`: step time and memory of full training vs BN-only variants, measured in turns.

Each variant runs in a fresh process of its own (spawn), as a training run holds one model
per process: in one shared process another variant's tensors would shape the allocator and
caches (on the CPU mode=all once ran 35% faster after the BN-only variants). All processes
build their model first, then measure in rounds: each round runs one step of every variant
in turn (A B C A B C ...) while the others wait on a pipe, so the machine's speed drifting
over minutes (shared CPUs, clocks) slows every variant alike. The first --warmup rounds are
not timed; each round's step times are printed as it ends. Reported per variant: the median
step time with its interquartile range (IQR), images/s; per round the step-time ratio to
all, bn-plain and naive (same round, same machine state), with median and IQR; "not
distinguishable" when that IQR contains 1. Then, variant by variant: FLOPs per step (and the
fraction of the GPU's bf16 peak), the bytes autograd saves for backward, peak memory (GPU:
allocated and reserved), and on a GPU the largest batch that fits, searched in a fresh
process per variant after the others exited. --data also times the configured data pipeline
alone.

Variants; the rest of the config is what `bnonly train` resolves (plan.resolve): precision,
channels_last, frozen dtype, checkpointed stages, compile, deterministic:
  all       mode=all, lean autograd as train resolves it for mode=all
  bn-plain  the config's mode (bn unless set), plain autograd
  bn-lean   the config's mode, lean autograd (models/layers.py)
  naive     the config's mode, plain autograd, NCHW, fp32 frozen weights, no checkpointing:
            what a user writes by hand with requires_grad=False
The report names the variant `bnonly train` runs with this config ("default"). Bench times
one process with the single-process engine (what ddp runs on each rank); other engines are
refused by name.
"""
from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import torch

from bnonly_dist import data, models
from bnonly_dist.config import Config, ConfigError
from bnonly_dist.config.catalog import ENGINES
from bnonly_dist.config.plan import resolve
from bnonly_dist.data.layout import DataError
from bnonly_dist.data.threads import dali_threads
from bnonly_dist.dist import choose_device
from bnonly_dist.models import memory
from bnonly_dist.perf.bench_runner import answer, search_batch, serve, sync

VARIANTS = ("all", "bn-plain", "bn-lean", "naive")
DEFAULT_VARIANTS = ("all", "bn-plain", "bn-lean")
BASELINES = ("all", "bn-plain", "naive")  # ratios are reported against these when measured

# Dense bf16 tensor-core peak, TFLOP/s (half the "with sparsity" figure), matched against
# torch.cuda.get_device_name in this order (most specific first). Source: NVIDIA's data
# sheets: H100 Tensor Core GPU datasheet (SXM 1,979 / NVL 1,671 / PCIe 1,513 sparse),
# H200 datasheet (SXM 1,979 / NVL 1,671 sparse), A100 datasheet (312 dense), L40S (362),
# A10 (125). SXM H100s report names like "NVIDIA H100 80GB HBM3".
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0))


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def check(cfg: Config, variants, steps: int, warmup: int) -> None:
    """ConfigError naming what bench cannot run as asked."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps {steps} --warmup {warmup}: need at least 1 timed step and 0 or more "
                          "warm-up steps, e.g. --steps 10 --warmup 3")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"--variants: unknown variant {unknown[0] if unknown else '(none)'}; "
                          f"choose from {','.join(VARIANTS)}")
    if not ENGINES[cfg.dist.engine].benched:
        benched = " or ".join(name for name, engine in ENGINES.items() if engine.benched)
        raise ConfigError(f"dist.engine={cfg.dist.engine}: bench times one process with the single-process "
                          f"engine (what {benched} runs on each rank); run it with dist.engine={benched}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bench runs in one process; start it without torchrun")
    if cfg.mode == "all" and any(v != "all" for v in variants):
        raise ConfigError("mode=all: the BN-only variants run the config's mode; set mode=bn (or another "
                          "mode that freezes weights) or --variants all")


def default_variant(cfg: Config, device: torch.device) -> str:
    """The variant `bnonly train` runs with cfg."""
    return "all" if cfg.mode == "all" else ("bn-lean" if resolve(cfg, device, memory=memory).lean else "bn-plain")


def _spread(values) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": float(min(values)),
            "max": float(max(values))}


def measure(cfg: Config, variants, steps: int, warmup: int, echo) -> list[dict]:
    """Every variant in its own process, stepping in turns; results in variant order."""
    context = multiprocessing.get_context("spawn")
    pipes, procs = {}, []
    try:
        for variant in variants:
            parent, child = context.Pipe()
            proc = context.Process(target=serve, args=(child, cfg, variant, cfg.data.batch_size), daemon=True)
            proc.start()
            child.close()
            pipes[variant] = parent
            procs.append(proc)
        for variant, conn in pipes.items():
            answer(conn, variant)
        times = {v: [] for v in variants}
        for round_ in range(warmup + steps):
            this_round = []
            for variant, conn in pipes.items():  # one step each, in turn: the others wait in recv()
                conn.send("step")
                seconds = answer(conn, variant)
                this_round.append(f"{variant} {1000 * seconds:.0f}")
                if round_ >= warmup:
                    times[variant].append(seconds)
            echo(f"round {round_ + 1}/{warmup + steps}{' (warm-up)' if round_ < warmup else ''}, ms: "
                 + ", ".join(this_round))
            if round_ == warmup - 1:
                for conn in pipes.values():
                    conn.send("reset")
        results = []
        for variant, conn in pipes.items():
            conn.send("finish")
            result = answer(conn, variant)
            spread = _spread(times[variant])
            result.update(step_time_s=spread["median"], step_time=spread, step_times_s=times[variant],
                          images_per_s=cfg.data.batch_size / spread["median"])
            result["achieved_tflops"] = result["flops_per_step"] / result["step_time_s"] / 1e12
            results.append(result)
            echo(_variant_line(result))
        return results
    except BaseException:
        for proc in procs:  # the others wait in recv() for a command that will not come
            proc.kill()
        raise
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


def ratios(results: list[dict]) -> dict:
    """Per-round step-time ratios of every variant to each measured baseline: median and IQR."""
    by_variant = {r["variant"]: r for r in results}
    out = {}
    for base in BASELINES:
        if base not in by_variant:
            continue
        for variant, r in by_variant.items():
            if variant == base:
                continue
            per_round = [t / b for t, b in zip(r["step_times_s"], by_variant[base]["step_times_s"])]
            spread = _spread(per_round)
            out.setdefault(variant, {})[base] = {
                "step_time": spread["median"], "q1": spread["q1"], "q3": spread["q3"],
                "distinguishable": not spread["q1"] <= 1.0 <= spread["q3"],
                "saved_activation_bytes": r["saved_activation_bytes"] / by_variant[base]["saved_activation_bytes"]}
    return out


def pipeline_rate(cfg: Config, device: torch.device, steps: int, warmup: int) -> dict:
    """Images/s of the configured data source alone (this process as rank 0 of 1).

    A source that prefetches (DALI) holds batches decoded before the clock started: the
    first of the timed batches come out of its queue at once, so they are not counted
    (counted, they made a 7-batch window up to 1.4x fast)."""
    try:
        source = data.build(cfg, resolve(cfg, device, memory=memory), 0, 1)
    except DataError as err:
        return {"source": cfg.data.name, "skipped": str(err)}
    prefetched = getattr(source, "prefetch_depth", 0)
    if steps <= prefetched:
        raise ConfigError(f"timing the data pipeline needs more than {prefetched} timed batches (its prefetch "
                          f"queue), got {steps}")
    batches = iter(source.train_epoch(0))
    count, start, i = 0, None, -1
    for i, (images, _) in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        elif i > warmup + prefetched:
            count += len(images)
        if i == warmup + steps:
            break
    sync(device)
    if i < warmup + steps:  # the epoch ended first: a rate over fewer batches than it claims
        return {"source": cfg.data.name, "skipped": f"an epoch has {i + 1} batches of {cfg.data.batch_size}, fewer "
                f"than the {warmup + steps + 1} the rate needs ({warmup} warm-up + {steps} timed + 1)"}
    decode = getattr(source, "decode", None)
    return {"source": cfg.data.name, "decode": decode, "threads": dali_threads(cfg.data.num_threads) if decode else None,
            "images_per_s": count / (time.perf_counter() - start), "batches": steps - prefetched,
            "batch": cfg.data.batch_size, "not_counted": prefetched}


def search_max_batches(cfg: Config, results: list[dict], limit: int, echo) -> None:
    """The largest batch of each variant, in a fresh process per variant, one at a time (a search
    needs the device's memory to itself); each line is echoed as soon as it is known."""
    context = multiprocessing.get_context("spawn")
    for result in results:
        with context.Pool(1) as pool:
            result["max_batch"] = pool.apply(search_batch, (cfg, result["variant"], limit))
        echo(f"{result['variant']}: largest batch that fits {result['max_batch']}")


def run(cfg: Config, steps: int = 10, warmup: int = 3, variants=DEFAULT_VARIANTS, with_data: bool = False,
        max_batch_limit: int = 4096, echo=lambda line: None, max_batch_only: bool = False) -> dict:
    """Measure variants in turns; echo(line) gets the header and each line as soon as it is known.
    max_batch_only: skip the timing and only search each variant's largest batch (on any device)."""
    variants = list(variants)
    check(cfg, variants, steps, warmup)
    if max_batch_only and max_batch_limit < 1:
        raise ConfigError("--max-batch-only needs --max-batch-limit of at least 8, e.g. 4096")
    device = choose_device(cfg.train.device, 0)
    plan, on_gpu = resolve(cfg, device, memory=memory), device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    report = {"arch": cfg.model.arch, "batch": cfg.data.batch_size, "mode": cfg.mode, "device": str(device),
              "device_name": name, "threads": torch.get_num_threads(), "precision": plan.precision,
              "channels_last": plan.channels_last, "lean": plan.lean, "default": default_variant(cfg, device),
              "activation_checkpointing": cfg.train.activation_checkpointing,
              "frozen_dtype": "bf16" if plan.frozen_dtype == torch.bfloat16 else "fp32",
              "image_size": 32 if models.parse_arch(cfg.model.arch).family == "cifar" else cfg.data.image_size,
              "steps": steps, "warmup": warmup, "peak_tflops": peak_tflops(name) if on_gpu else None}
    if max_batch_only:
        echo(f"{report['arch']} {report['image_size']}px on {name}: the largest batch of {', '.join(variants)} "
             f"up to {max_batch_limit}")
        report["results"] = [{"variant": v} for v in variants]
        search_max_batches(cfg, report["results"], max_batch_limit, echo)
        return report
    for line in _header(report):
        echo(line)
    report["results"] = measure(cfg, variants, steps, warmup, echo)
    report["ratios"] = ratios(report["results"])
    report["over_all"] = {v: r["all"] for v, r in report["ratios"].items() if "all" in r}
    for line in _ratio_lines(report):
        echo(line)
    if on_gpu and max_batch_limit:
        search_max_batches(cfg, report["results"], max_batch_limit, echo)
    else:
        for result in report["results"]:
            result["max_batch"] = None
    if report["peak_tflops"]:
        best = max(r["achieved_tflops"] for r in report["results"])
        echo(f"peak bf16 {report['peak_tflops']:.0f} TFLOP/s; best variant reaches "
             f"{100 * best / report['peak_tflops']:.1f}% of it")
    if with_data:
        report["data_pipeline"] = pipeline_rate(cfg, device, steps, warmup)
        echo(_pipeline_line(report))
    return report


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _header(report: dict) -> list[str]:
    return [f"{report['arch']} batch {report['batch']} {report['image_size']}px on {report['device_name']} "
            f"({report['threads']} threads, {report['precision']}, channels_last={report['channels_last']}, "
            f"activation checkpointing {report['activation_checkpointing'] or 'off'}, "
            f"frozen weights {report['frozen_dtype']}); mode={report['mode']}, `bnonly train` runs "
            f"{report['default']}; {report['warmup']} warm-up + {report['steps']} timed rounds, variants in turn",
            f"{'variant':<10}{'trainable':>12}{'step ms':>10}{'IQR ms':>14}{'img/s':>9}{'TFLOP/s':>9}"
            f"{'saved act MiB':>15}{'KiB/img':>9}{'peak MiB':>10}{'reserved':>10}"]


def _variant_line(r: dict) -> str:
    t = r["step_time"]
    iqr = f"{1000 * t['q1']:.0f}-{1000 * t['q3']:.0f}"
    return (f"{r['variant']:<10}{r['trainable_params']:>12,}{1000 * t['median']:>10.1f}{iqr:>14}"
            f"{r['images_per_s']:>9.1f}{r['achieved_tflops']:>9.3f}"
            f"{r['saved_activation_bytes'] / 2**20:>15.1f}{r['saved_activation_bytes_per_image'] / 2**10:>9.0f}"
            f"{_mib(r['peak_memory_bytes']):>10}{_mib(r['peak_reserved_bytes']):>10}")


def _ratio_lines(report: dict) -> list[str]:
    lines = []
    for variant, by_base in report["ratios"].items():
        if variant == "all":  # the JSON has it; the lines compare the BN-only variants with their baselines
            continue
        parts = []
        for base, ratio in by_base.items():
            verdict = "" if ratio["distinguishable"] else ", not distinguishable"
            parts.append(f"{variant}/{base}: step time {ratio['step_time']:.2f}x (IQR {ratio['q1']:.2f}-"
                         f"{ratio['q3']:.2f}{verdict}), saved activations {ratio['saved_activation_bytes']:.2f}x")
        lines.append("; ".join(parts))
    return lines


def _pipeline_line(report: dict) -> str:
    pipe = report["data_pipeline"]
    if "skipped" in pipe:
        return f"data pipeline: skipped ({pipe['skipped']})"
    fastest = max(r["images_per_s"] for r in report["results"])
    bound = "loading" if pipe["images_per_s"] < fastest else "compute"
    how = f", {pipe['decode']} decode, {pipe['threads']} threads" if pipe["decode"] else ""
    return (f"data pipeline alone ({pipe['source']}{how}): {pipe['images_per_s']:.1f} img/s; "
            f"the fastest variant trains {fastest:.1f} img/s, so {bound} bounds a step")

