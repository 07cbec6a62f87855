"""`bnonly eval RUN_DIR`: evaluate the newest checkpoint of a finished or stopped run.

Top-1, top-5 and per-class accuracy over the whole validation set (every image once
across ranks), appended to RUN/eval.jsonl; metrics.jsonl, summary.json and TensorBoard
stay as the run left them. Overrides may point at another copy of the data or device; the
data set is checked against the run's record as a training start checks it (other data only
with --other-data), and each line of eval.jsonl records the data it was evaluated on.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path


from bnonly_dist import data, dist, engines, network
from bnonly_dist.config import ConfigError, apply_overrides, from_dict, parse_override, read_run_config
from bnonly_dist.config import plan as plans
from bnonly_dist.config.catalog import num_classes
from bnonly_dist.models import memory
from bnonly_dist.run import rundir
from bnonly_dist.run.checkpoint import Checkpointer, CheckpointError
from bnonly_dist.run.evaluate import evaluate
from bnonly_dist.run.paths import RunPaths

log = logging.getLogger(__name__)
# What may differ from the run's own config: where the data is and how evaluation runs, not what was trained.
ALLOWED_PREFIXES = ("data.root", "data.eval_batch_size", "data.num_threads", "data.decode", "train.device",
                    "train.precision", "train.channels_last", "dist.timeout_s")


def load_run_config(run_paths: RunPaths, overrides: list[str]):
    """(the run's config with the overrides, the run's own identity) from RUN/config.yaml."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in ALLOWED_PREFIXES:
            raise ConfigError(f"bnonly eval: {key} cannot change after training; only {', '.join(ALLOWED_PREFIXES)}")
    saved = read_run_config(run_paths.config, f"{run_paths.root} has no config.yaml: pass the directory of a run "
                                               "(bnonly train wrote it)")
    identity = from_dict(saved).identity()
    return from_dict(apply_overrides(saved, list(overrides))), identity


def run(run_dir: Path, overrides: list[str] = (), other_data: bool = False) -> dict:
    """Evaluate; other_data: allow a data set other than the one the run trained on (recorded either way)."""
    run_paths = RunPaths(Path(run_dir))
    cfg, identity = load_run_config(run_paths, list(overrides))
    ctx = dist.init(cfg.train.device, cfg.dist.timeout_s, cfg.train.deterministic)
    # Hold the run dir: resume may move a damaged checkpoint aside, which must not race a trainer.
    lock = rundir.acquire(run_paths.root) if ctx.is_main else None
    try:
        return _evaluate(run_paths, cfg, identity, ctx, other_data)
    finally:
        if lock is not None:
            lock.release()


def _evaluate(run_paths: RunPaths, cfg, identity: dict, ctx, other_data: bool) -> dict:
    plan = plans.resolve(cfg, ctx.device, ctx.world, memory)
    source = data.build(cfg, plan, ctx.rank, ctx.world)
    # What the data set is, checked against the run's record as a training start does (rank 0 reads; all agree).
    data_record = dist.broadcast_object(data.identity_of(cfg, source) if ctx.is_main else None)
    differs = dist.broadcast_object(rundir.data_difference(run_paths.root, data_record) if ctx.is_main else None)
    if differs and not other_data:
        raise ConfigError(f"{run_paths.root} trained on other data than data.root={cfg.data.root}: {differs[0]} (from "
                          f"{differs[1]}); point data.root at the data set it trained on, or pass --other-data to "
                          "evaluate on this one on purpose")
    classes = num_classes(cfg, source)
    net = network.build(cfg, plan, classes)
    engine = engines.wrap(cfg, plan, net.model, net.masks, ctx)
    ckpt = Checkpointer(run_paths.root, ctx.rank, ctx.world, engine, source, net.frozen_sha, every=1, keep=1,
                        save_frozen=False, steps_per_epoch=source.steps_per_epoch, identity=identity)
    resumed = ckpt.resume()  # collective
    if resumed is None:
        raise CheckpointError(f"{run_paths.checkpoints} holds no complete checkpoint to evaluate")
    started = time.perf_counter()
    with engine.world_bn_statistics():  # collective: the world's mean of the BN running statistics
        result = evaluate(engine.net, source.eval_batches(), plan.device, plan.autocast, plan.memory_format,
                          num_classes=classes)  # collective: all-reduced sums
    record = {"kind": "eval", "step": resumed.step, "checkpoint": str(resumed.path), "world": ctx.world,
              "eval_s": time.perf_counter() - started, "data_root": cfg.data.root, "data": data_record,
              "training_data": not differs, **result}
    if ctx.is_main:
        with open(run_paths.eval_metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if differs:
            log.warning("evaluated on other data than the run trained on (--other-data): %s", differs[0])
        print(f"{run_paths.root} step {resumed.step}: top1 {result['top1']:.2f}% top5 {result['top5']:.2f}% "
              f"loss {result['loss']:.4f} ({result['count']} images); written to {run_paths.eval_metrics}")
        per_class = result["per_class_top1"]
        worst = sorted(range(len(per_class)), key=lambda c: per_class[c])[:5]
        print("per-class top-1 (worst 5): " + ", ".join(f"class {c} {per_class[c]:.1f}%" for c in worst))
    return record
