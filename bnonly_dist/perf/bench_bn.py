"""`torchrun --nproc-per-node W -m bnonly_dist.perf.bench_bn CONFIG [key=value ...]`: what BN statistics
over train.bn_batch images cost per training step, against each rank's own batch.

Variants, built once and timed in turns (A B C A B C ...) on synthetic batches in one
process group, so that a machine's drift hits them alike (wall time per step, and rank 0's
CPU time per step, which a machine loaded by others disturbs less):

    per-rank  train.bn_batch = the per-rank batch: nn.BatchNorm2d's kernels, no collective
    ghost     train.bn_batch = half the per-rank batch: two groups per rank, no collective
    sync      train.bn_batch = the global batch: one statistic over every rank (per BN layer
              and step: an all-gather in forward, an all-reduce in backward)
    sync-alone  sync's code path with each rank in a group of its own: its work without its
              waits, so that sync - sync-alone is what the step spends in its collectives
              (each rank waiting for the others included), sync-alone - per-rank the rest

Each variant's peak memory of one step (after the timed turns): the most bytes torch held at
once during the step beyond what it held at its start (torch.cuda.max_memory_allocated on
a GPU; on the CPU the allocations and frees torch.profiler records, in order).

Also the two collectives of one BN layer alone (C = 256 channels), whose median latency
times the number of BN layers estimates the synchronisation's cost on another network
or interconnect. Rank 0 prints a table and, with --json, writes the numbers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
import torch.distributed as torch_dist

from bnonly_dist import dist, engines, network
from bnonly_dist.config import load, parse_args
from bnonly_dist.config import plan as plans
from bnonly_dist.config.catalog import num_classes, parse_arch
from bnonly_dist.models import memory
from bnonly_dist.models.bn_groups import all_gather_single, running_statistics
from bnonly_dist.models.layers import set_bn_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()  # host side: every rank's steps are done


def collective_latency(device: torch.device, channels: int = 256, repeats: int = 50) -> float:
    """Median seconds of one BN layer's two collectives over the whole world (all-gather of 2C+1, all-reduce of 2C)."""
    mine = torch.zeros(2 * channels + 1, device=device)
    gathered = torch.empty(torch_dist.get_world_size() * mine.numel(), device=device)
    sums = torch.zeros(2 * channels, device=device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        all_gather_single(gathered, mine)
        torch_dist.all_reduce(sums)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_peak_bytes(step, device: torch.device) -> int:
    """The most bytes torch held at once while step() ran, beyond what it held when it began."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = []  # (time, +bytes allocated / -bytes freed) of every thread the profiler saw
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation:
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
    return max(itertools.accumulate(size for _, size in sorted(changes)), default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnonly_dist.perf.bench_bn", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value")
    p.add_argument("--steps", type=int, default=5, help="steps per turn")
    p.add_argument("--turns", type=int, default=5, help="turns per variant (A B C A B C ...)")
    p.add_argument("--json", help="write the numbers here (rank 0)")
    args = parse_args(p, argv)
    base = load(args.config, args.overrides)
    ctx = dist.init(base.train.device, base.dist.timeout_s, base.train.deterministic)
    per_rank = plans.per_rank(base.data.batch_size, ctx.world)
    bn_batches = {"per-rank": per_rank, "ghost": per_rank // 2, "sync": base.data.batch_size}
    alone = [torch_dist.new_group([r]) for r in range(ctx.world)] if ctx.world > 1 else []  # collective
    if alone:
        bn_batches["sync-alone"] = per_rank
    variants = {}
    for name, bn_batch in bn_batches.items():
        cfg = load(args.config, [*args.overrides, f"train.bn_batch={bn_batch}"])
        plan = plans.resolve(cfg, ctx.device, ctx.world, memory)
        net = network.build(cfg, plan, num_classes(cfg))
        if name == "sync-alone":
            set_bn_groups(net.model, 1, alone[ctx.rank])
        variants[name] = (plan, engines.wrap(cfg, plan, net.model, net.masks, ctx))
    size = 32 if parse_arch(base.model.arch).family == "cifar" else base.data.image_size
    classes = num_classes(base)
    device = ctx.device
    generator = torch.Generator(device=device).manual_seed(ctx.rank)
    images = torch.randn(per_rank, 3, size, size, device=device, generator=generator)
    labels = torch.randint(0, classes, (per_rank,), device=device, generator=generator)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}  # this process's CPU seconds
    for turn in range(args.turns + 1):  # turn 0 warms every variant up and is not counted
        for name, (plan, engine) in variants.items():
            batch = images.contiguous(memory_format=plan.memory_format)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                engine.train_step(batch, labels, plan.autocast)
            _sync(device)
            if turn:
                times[name].append((time.perf_counter() - start) / args.steps)
                cpu_times[name].append((time.process_time() - cpu_start) / args.steps)
    peaks = {}
    for name, (plan, engine) in variants.items():
        batch = images.contiguous(memory_format=plan.memory_format)
        peaks[name] = step_peak_bytes(lambda: engine.train_step(batch, labels, plan.autocast), device)
        _sync(device)
    latency = collective_latency(device) if ctx.world > 1 else 0.0
    layers = len(running_statistics(variants["per-rank"][1].model)) // 2
    reference, cpu_reference = statistics.median(times["per-rank"]), statistics.median(cpu_times["per-rank"])
    rows = [{"variant": name, "bn_batch": bn_batches[name], "step_s": statistics.median(t), "min_s": min(t),
             "max_s": max(t), "ratio": statistics.median(t) / reference,
             "cpu_s": statistics.median(cpu_times[name]), "cpu_ratio": statistics.median(cpu_times[name]) / cpu_reference,
             "peak_bytes": peaks[name], "peak_ratio": peaks[name] / peaks["per-rank"]} for name, t in times.items()]
    report = {"config": args.config, "overrides": args.overrides, "arch": base.model.arch, "world": ctx.world,
              "device": str(device), "batch": base.data.batch_size, "per_rank": per_rank, "bn_layers": layers,
              "steps": args.steps, "turns": args.turns, "collective_s": latency, "results": rows}
    if ctx.is_main:
        print(f"{base.model.arch}, global batch {base.data.batch_size} on {ctx.world} ranks ({device}), "
              f"{layers} BN layers, {args.turns} turns of {args.steps} steps")
        print("| variant | train.bn_batch | step s (median) | min - max | vs per-rank | CPU s of rank 0 | vs per-rank | "
              "peak MiB of a step (rank 0) | vs per-rank |\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['bn_batch']} | {r['step_s']:.4f} | {r['min_s']:.4f} - {r['max_s']:.4f} | "
                  f"{r['ratio']:.2f}x | {r['cpu_s']:.4f} | {r['cpu_ratio']:.2f}x | {r['peak_bytes'] / 2**20:.1f} | "
                  f"{r['peak_ratio']:.3f}x |")
        if "sync-alone" in times:
            waited = statistics.median(times["sync"]) - statistics.median(times["sync-alone"])
            print(f"sync's collectives inside the step (sync - sync-alone): {waited * 1e3:.1f} ms = "
                  f"{waited / reference:.2f}x of per-rank; the rest of sync's cost (sync-alone - per-rank): "
                  f"{statistics.median(times['sync-alone']) / reference - 1:.2f}x")
        if ctx.world > 1:
            print(f"one BN layer's collectives (all-gather + all-reduce, 256 channels): {latency * 1e3:.3f} ms; "
                  f"x {layers} layers = {latency * layers * 1e3:.1f} ms per step")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    dist.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
