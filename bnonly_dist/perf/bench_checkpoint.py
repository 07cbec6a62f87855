"""`bnonly bench-checkpoint`: size, save and load time of a real checkpoint of one run's
state, with frozen weights left out (the default) and stored (dist.save_frozen=true).
Writes under --dir (runs/bench-checkpoint by default) and removes each checkpoint after
timing it. Runs under torchrun too, to time the sharded save of any engine."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

from bnonly_dist import dist, engines, models, network
from bnonly_dist.config import Config
from bnonly_dist.config import plan as plans
from bnonly_dist.config.catalog import num_classes
from bnonly_dist.models import memory
from bnonly_dist.run import checkpoint


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run(cfg: Config, out_dir: Path, repeats: int = 3) -> dict:
    ctx = dist.init(cfg.train.device, cfg.dist.timeout_s, cfg.train.deterministic)
    plan = plans.resolve(cfg, ctx.device, ctx.world, memory)
    classes = num_classes(cfg)
    size = 32 if models.parse_arch(cfg.model.arch).family == "cifar" else cfg.data.image_size
    start = time.perf_counter()  # what a resume without stored frozen weights does instead of reading them
    net = network.build(cfg, plan, classes)
    regenerate_s = time.perf_counter() - start
    total_params, trainable, frozen_sha = net.total, net.trainable, net.frozen_sha
    engine = engines.wrap(cfg, plan, net.model, net.masks, ctx)
    device = plan.device
    # One real step, so the optimizer holds its momentum buffers as in any saved run.
    images = torch.randn(2, 3, size, size, device=device).contiguous(memory_format=plan.memory_format)
    engine.train_step(images, torch.randint(0, classes, (2,), device=device), plan.autocast)
    meta = {"step": 1, "epoch": 0, "world": ctx.world, "engine": engine.name, "frozen_sha256": frozen_sha}
    results = []
    for include_frozen in (False, True):
        saves, loads, nbytes = [], [], 0
        for i in range(repeats):
            run_dir = Path(out_dir) / f"frozen{int(include_frozen)}-{i}"
            dist.barrier()
            start = time.perf_counter()
            path = checkpoint.save(run_dir, engine, ctx.rank, meta, {}, keep=1, include_frozen=include_frozen)
            saves.append(time.perf_counter() - start)
            nbytes = _bytes(path)
            dist.barrier()
            start = time.perf_counter()
            checkpoint.load(path, engine, ctx.rank, ctx.world, frozen_sha)
            dist.barrier()
            loads.append(time.perf_counter() - start)
            if ctx.is_main:
                shutil.rmtree(run_dir)
        results.append({"frozen_included": include_frozen, "bytes": nbytes, "save_s": statistics.median(saves),
                        "load_s": statistics.median(loads)})
    return {"arch": cfg.model.arch, "mode": cfg.mode, "engine": engine.name, "world": ctx.world, "device": str(device),
            "total_params": total_params, "trainable_params": trainable, "repeats": repeats, "dir": str(out_dir),
            "regenerate_and_hash_frozen_s": regenerate_s, "results": results}


def format_report(report: dict) -> str:
    lines = [f"{report['arch']} mode={report['mode']} ({report['trainable_params']:,} of {report['total_params']:,} "
             f"parameters train), engine {report['engine']} x{report['world']}, median of {report['repeats']}, "
             f"in {report['dir']}",
             f"{'frozen weights':<16}{'size MiB':>10}{'save s':>9}{'load s':>9}"]
    for r in report["results"]:
        lines.append(f"{'stored' if r['frozen_included'] else 'regenerated':<16}{r['bytes'] / 2**20:>10.2f}"
                     f"{r['save_s']:>9.3f}{r['load_s']:>9.3f}")
    lines.append(f"regenerating and hashing the frozen weights from the seed: {report['regenerate_and_hash_frozen_s']:.2f} s")
    return "\n".join(lines)
