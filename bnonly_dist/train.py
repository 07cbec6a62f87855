"""One training run: build everything from the config, train, evaluate, checkpoint, resume."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from bnonly_dist import checkpoint, data, dist, models, modes
from bnonly_dist.config import Config, ConfigError, from_dict, save
from bnonly_dist.evaluate import evaluate
from bnonly_dist.metrics import Metrics, gamma_stats, setup_logging
from bnonly_dist.schedule import lr_at

log = logging.getLogger("bnonly")


def prepare_run_dir(cfg: Config, run_dir: Path, is_main: bool) -> None:
    """Create the run directory, or check that an existing one ran this same config."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = from_dict(yaml.safe_load(saved.read_text())).identity()
        new = cfg.identity()
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            key = changed[0]
            raise ConfigError(f"{run_dir} holds a run with {key}={old.get(key)!r}, not {new.get(key)!r}; "
                              "pass a new --run-dir or the original settings")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save(cfg, saved)


def make_optimizer(model: torch.nn.Module, masks: dict, optim) -> torch.optim.Optimizer | None:
    """SGD over the trainable tensors; masked ones decay inside modes.mask_gradients."""
    full = [p for n, p in model.named_parameters() if p.requires_grad and n not in masks]
    partial = [p for n, p in model.named_parameters() if p.requires_grad and n in masks]
    groups = [{"params": full, "weight_decay": optim.weight_decay}, {"params": partial, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return None  # mode none: only BN running statistics move
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)


def train_step(net, model, optimizer, masks, images, labels, weight_decay, autocast):
    with autocast(), torch.set_grad_enabled(optimizer is not None):
        logits = net(images)
        loss = F.cross_entropy(logits.float(), labels)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        modes.mask_gradients(model, masks, weight_decay)
        optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).float().mean().detach()


def run(cfg: Config, run_dir: Path | None = None) -> dict:
    ctx = dist.init(cfg.train.device)
    run_dir = Path(run_dir) if run_dir else Path(cfg.runs_root) / cfg.run_name()
    prepare_run_dir(cfg, run_dir, ctx.is_main)
    dist.barrier()
    setup_logging(run_dir, ctx.rank)
    torch.use_deterministic_algorithms(cfg.train.deterministic)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    on_gpu = ctx.device.type == "cuda"
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    autocast = functools.partial(torch.autocast, ctx.device.type, torch.bfloat16) if bf16 else contextlib.nullcontext
    channels_last = cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and on_gpu)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    source = data.build(cfg, ctx.rank, ctx.world, ctx.device)
    model = models.build(cfg.model.arch, cfg.model.num_classes or source.num_classes, cfg.seed, cfg.model.bn_init)
    masks = modes.apply(model, cfg.mode, cfg.seed)
    frozen_sha = checkpoint.frozen_digest(model)
    model.to(ctx.device, memory_format=memory_format)
    masks = {n: m.to(ctx.device) for n, m in masks.items()}
    optimizer = make_optimizer(model, masks, cfg.optim)
    net = model
    if ctx.world > 1 and optimizer is not None:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if on_gpu else None)
    if cfg.train.compile:
        net = torch.compile(net)

    step = 0
    restored = checkpoint.resume(run_dir, model, optimizer, ctx.rank, frozen_sha)
    if restored:
        path, progress, data_state = restored
        step = progress["step"]
        source.load_state(data_state)
        log.info("resumed from %s at step %d", path, step)
    spe = source.steps_per_epoch
    total = cfg.optim.epochs * spe
    end = min(total, cfg.train.max_steps or total)
    metrics = Metrics(run_dir, ctx.is_main)
    log.info("run %s: %s mode=%s, %d trainable of %d parameters, %d steps/epoch, steps %d -> %d on %s x%d",
             run_dir, cfg.model.arch, cfg.mode, modes.trainable_count(model, masks),
             sum(p.numel() for p in model.parameters()), spe, step, end, ctx.device, ctx.world)
    bar_enabled = cfg.train.progress == "bar" or (cfg.train.progress == "auto" and sys.stdout.isatty())
    bar = tqdm(total=end, initial=step, disable=not (bar_enabled and ctx.is_main), dynamic_ncols=True)

    def save_checkpoint():
        progress = {"step": step, "epoch": step // spe}
        return checkpoint.save(run_dir, step, model, optimizer, ctx.rank, progress, source.state(),
                               frozen_sha, cfg.train.keep_checkpoints)

    def run_eval():
        result = evaluate(net, source.eval_batches(), ctx.device, autocast, memory_format)
        result.update(epoch=step / spe, **gamma_stats(model, cfg.train.gamma_threshold))
        metrics.log("eval", step, result)
        metrics.histograms(step, model)
        log.info("eval step %d epoch %.2f: top1 %.2f%% top5 %.2f%% loss %.4f (%d images)",
                 step, step / spe, result["top1"], result["top5"], result["loss"], result["count"])
        return result

    started = time.perf_counter()
    window = {"loss": torch.zeros((), device=ctx.device), "acc": torch.zeros((), device=ctx.device),
              "n": 0, "wait": 0.0, "t": time.perf_counter()}
    last_eval = None
    while step < end:
        epoch = step // spe
        batches = iter(source.train_epoch(epoch, step % spe))
        while step < end:
            tick = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            window["wait"] += time.perf_counter() - tick
            images = images.to(ctx.device, non_blocking=True).contiguous(memory_format=memory_format)
            labels = labels.to(ctx.device, non_blocking=True)
            for group in optimizer.param_groups if optimizer else []:
                group["lr"] = lr_at(step, spe, cfg.optim)
            loss, acc = train_step(net, model, optimizer, masks, images, labels, cfg.optim.weight_decay, autocast)
            step += 1
            bar.update(1)
            window["loss"] += loss
            window["acc"] += acc
            window["n"] += 1
            if step % cfg.train.log_every == 0 or step == end:
                elapsed = time.perf_counter() - window["t"]
                values = {"loss": window["loss"].item() / window["n"], "top1": 100 * window["acc"].item() / window["n"],
                          "lr": lr_at(step - 1, spe, cfg.optim), "epoch": step / spe,
                          "images_per_s": window["n"] * cfg.data.batch_size / elapsed,
                          "data_wait_frac": window["wait"] / elapsed}
                metrics.log("train", step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.3g}")
                if not bar_enabled:
                    log.info("step %d/%d epoch %.2f loss %.4f top1 %.1f%% lr %.4g %.0f img/s data-wait %.0f%%", step,
                             end, values["epoch"], values["loss"], values["top1"], values["lr"],
                             values["images_per_s"], 100 * values["data_wait_frac"])
                window.update(loss=torch.zeros_like(window["loss"]), acc=torch.zeros_like(window["acc"]), n=0,
                              wait=0.0, t=time.perf_counter())
            if step % cfg.train.checkpoint_every == 0:
                save_checkpoint()
        if step % spe == 0 and (step // spe) % cfg.train.eval_every == 0:
            last_eval = (step, run_eval())
    bar.close()
    save_checkpoint()
    final = last_eval[1] if last_eval and last_eval[0] == step else run_eval()
    summary = {"run_dir": str(run_dir), "arch": cfg.model.arch, "mode": cfg.mode, "seed": cfg.seed,
               "dataset": cfg.data.name, "step": step, "epoch": step / spe, "finished": step >= total,
               "trainable_params": modes.trainable_count(model, masks), "final": final,
               "fingerprint": checkpoint.fingerprint(model), "wall_time_s": time.perf_counter() - started}
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: top1 %.2f%% top5 %.2f%%; summary %s; TensorBoard: tensorboard --logdir %s",
                 final["top1"], final["top5"], run_dir / "summary.json", run_dir / "tb")
    metrics.close()
    dist.barrier()
    return summary
