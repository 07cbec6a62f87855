"""One training run: build everything from the config, train, evaluate, checkpoint, resume."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bnonly_dist import checkpoint, data, dist, engines, network, rundir
from bnonly_dist import plan as plan_mod
from bnonly_dist.config import Config, ConfigError
from bnonly_dist.data.layout import check_num_classes
from bnonly_dist.evaluate import evaluate
from bnonly_dist.metrics import Metrics, StepMeter, gamma_stats, setup_logging
from bnonly_dist.optim import lr_at
from bnonly_dist.stop import StopRequest

log = logging.getLogger("bnonly")


class Run:
    """One training run: the pieces built from the config, the loop, checkpoints, summary."""

    def __init__(self, cfg: Config, run_dir: Path | None = None):
        self.cfg, self.ctx = cfg, dist.init(cfg.train.device, cfg.dist.timeout_s)
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.runs_root) / cfg.run_name()
        # Rank 0 checks, locks (held for the whole run) and writes; every rank gets its verdict.
        refusal, self.lock = None, None
        if self.ctx.is_main:
            try:
                self.lock = rundir.prepare(cfg, self.run_dir, hold=True)
            except ConfigError as err:
                refusal = err
        verdict = dist.broadcast_object(str(refusal) if refusal else None)
        if verdict is not None:
            raise refusal or ConfigError(verdict)
        try:
            self._build(cfg)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _build(self, cfg: Config) -> None:
        setup_logging(self.run_dir, self.ctx.rank)
        torch.use_deterministic_algorithms(cfg.train.deterministic)
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        self.plan = plan_mod.resolve(cfg, self.ctx.device)
        self.autocast, self.memory_format = self.plan.autocast, self.plan.memory_format

        self.source = data.build(cfg, self.ctx.rank, self.ctx.world, self.ctx.device)
        check_num_classes(cfg.model.num_classes, self.source.num_classes, cfg.data.root or "the synthetic data")
        self.num_classes = network.num_classes(cfg, self.source)
        # Every rank builds the same frozen weights from the seed; engines may then shard them.
        net = network.build(cfg, self.plan, self.num_classes)
        self.model, masks, self.frozen_sha = net.model, net.masks, net.frozen_sha
        self.lean = self.plan.lean
        self.trainable, self.total_params = net.trainable, net.total
        self.engine = engines.wrap(cfg, self.plan, self.model, masks, self.ctx)
        if cfg.train.compile:
            self.engine.compile()

        self.step = 0
        self.steps_per_epoch = self.source.steps_per_epoch
        self.total = cfg.optim.epochs * self.steps_per_epoch
        self.end = min(self.total, cfg.train.max_steps or self.total)
        self.ckpt = checkpoint.Checkpointer(
            self.run_dir, self.ctx.rank, self.ctx.world, self.engine, self.source, self.frozen_sha,
            every=cfg.train.checkpoint_every, keep=cfg.train.keep_checkpoints, save_frozen=cfg.dist.save_frozen,
            steps_per_epoch=self.steps_per_epoch, identity=cfg.identity())
        self.metrics = Metrics(self.run_dir, self.ctx.is_main)
        self.bar_enabled = cfg.train.progress == "bar" or (cfg.train.progress == "auto" and sys.stdout.isatty())

    def resume(self) -> None:
        restored = self.ckpt.resume()
        if not restored:
            return
        self.step, self.frozen_sha = restored.step, restored.frozen_sha
        log.info("resumed from %s at step %d", restored.path, self.step)
        if restored.world != self.ctx.world:
            batch = self.cfg.data.batch_size
            log.warning("checkpoint written by %d ranks, resuming on %d: the data position is global (epoch %d, "
                        "step %d), so the remaining global batches are the same and each rank takes its slice; BN "
                        "batch statistics now come from %d images per rank instead of %d", restored.world,
                        self.ctx.world, self.step // self.steps_per_epoch, self.step % self.steps_per_epoch,
                        batch // self.ctx.world, batch // restored.world)

    def save_checkpoint(self, final: bool = False) -> Path:
        return self.ckpt.save(self.step, final=final)

    def evaluate(self) -> dict:
        self.engine.sync_buffers()
        result = evaluate(self.engine.net, self.source.eval_batches(), self.ctx.device, self.autocast,
                          self.memory_format)
        bn_params = self.engine.bn_parameters()
        result.update(epoch=self.step / self.steps_per_epoch, **gamma_stats(bn_params, self.cfg.train.gamma_threshold))
        self.metrics.log("eval", self.step, result)
        self.metrics.histograms(self.step, bn_params)
        log.info("eval step %d epoch %.2f: top1 %.2f%% top5 %.2f%% loss %.4f (%d images)", self.step,
                 result["epoch"], result["top1"], result["top5"], result["loss"], result["count"])
        return result

    def log_train(self, values: dict) -> None:
        values.update(lr=lr_at(self.step - 1, self.steps_per_epoch, self.cfg.optim),
                      epoch=self.step / self.steps_per_epoch)
        # Watch gammas switch channels off as it happens, not only at evaluations.
        values.update(gamma_stats(self.engine.bn_parameters(), self.cfg.train.gamma_threshold))
        self.metrics.log("train", self.step, values)
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.3g}")
        if not self.bar_enabled:
            log.info("step %d/%d epoch %.2f loss %.4f top1 %.1f%% lr %.4g %.0f img/s data-wait %.0f%%", self.step,
                     self.end, values["epoch"], values["loss"], values["top1"], values["lr"],
                     values["images_per_s"], 100 * values["data_wait_frac"])

    def train(self) -> dict:
        cfg, spe = self.cfg, self.steps_per_epoch
        self.resume()
        log.info("run %s: %s mode=%s, %d trainable of %d parameters, %d steps/epoch, steps %d -> %d on %s x%d (%s)",
                 self.run_dir, cfg.model.arch, cfg.mode, self.trainable, self.total_params, spe, self.step, self.end,
                 self.ctx.device, self.ctx.world, self.engine.name)
        log.info("lean autograd %s, activation checkpointing in stages %s, frozen weights %s",
                 "on" if self.lean else "off", cfg.train.activation_checkpointing or "none", cfg.train.frozen_dtype)
        log.info("this rank holds %d of the %d parameter numbers (%s)", self.engine.local_numel(), self.total_params,
                 self.engine.name)
        self.bar = tqdm(total=self.end, initial=self.step, dynamic_ncols=True,
                        disable=not (self.bar_enabled and self.ctx.is_main))
        started, meter, last_eval = time.perf_counter(), StepMeter(self.ctx.device, cfg.data.batch_size), None
        stop = StopRequest(cfg.train.stop_check_every)
        try:
            while self.step < self.end:
                batches = iter(self.source.train_epoch(self.step // spe, self.step % spe))
                while self.step < self.end and (batch := meter.next_batch(batches)) is not None:
                    images = batch[0].to(self.ctx.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                    labels = batch[1].to(self.ctx.device, non_blocking=True)
                    self.engine.set_lr(lr_at(self.step, spe, cfg.optim))
                    loss, top1 = self.engine.train_step(images, labels, self.autocast)
                    self.step += 1
                    meter.add(loss, top1)
                    self.bar.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == self.end:
                        self.log_train(meter.report())
                    self.ckpt.maybe_save(self.step)
                    if stop.agreed(self.step):
                        return self.stopped(stop)
                if self.step % spe == 0 and (self.step // spe) % cfg.train.eval_every == 0:
                    last_eval = (self.step, self.evaluate())
        finally:
            stop.close()
            self.bar.close()
        self.save_checkpoint(final=True)
        final = last_eval[1] if last_eval and last_eval[0] == self.step else self.evaluate()
        return self.finish(final, time.perf_counter() - started)

    def stopped(self, stop: StopRequest) -> dict:
        """All ranks agreed to stop on a signal: save together and leave without a summary."""
        path = self.save_checkpoint()
        log.warning("stopped at step %d by %s; checkpoint %s; run the same command to resume", self.step,
                    stop.signal_name or "a signal to another rank", path)
        self.metrics.close()
        stop.hand_over()  # under submitit: requeue the job
        return {"run_dir": str(self.run_dir), "step": self.step, "finished": False, "stopped": True,
                "checkpoint": str(path)}

    def finish(self, final: dict, wall_time_s: float) -> dict:
        summary = {"run_dir": str(self.run_dir), "arch": self.cfg.model.arch, "mode": self.cfg.mode,
                   "seed": self.cfg.seed, "dataset": self.cfg.data.name, "step": self.step,
                   "epoch": self.step / self.steps_per_epoch, "finished": self.step >= self.total,
                   "world": self.ctx.world, "engine": self.engine.name, "trainable_params": self.trainable,
                   "num_classes": self.num_classes,
                   "final": final, "fingerprint": checkpoint.fingerprint(self.engine.full_state_dict()),
                   "wall_time_s": wall_time_s}
        if self.ctx.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("done: top1 %.2f%% top5 %.2f%%; summary %s; TensorBoard: tensorboard --logdir %s",
                     final["top1"], final["top5"], self.run_dir / "summary.json", self.run_dir / "tb")
        self.metrics.close()
        dist.barrier()
        return summary


def run(cfg: Config, run_dir: Path | None = None) -> dict:
    """Train (or resume) one run to its end; returns the summary also written to summary.json."""
    run_ = Run(cfg, run_dir)
    try:
        return run_.train()
    finally:
        run_.release()  # the run dir's lock (the OS drops it too if the process dies)
