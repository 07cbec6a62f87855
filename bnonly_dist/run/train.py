"""One training run: build it from the config, then step, log, maybe evaluate, maybe save, stop if agreed.

Flow: config -> dist.init (rank, world, device) -> plan.resolve (every auto setting) ->
rundir.claim (the one check, the lock) -> data.build ->
rundir.create (config.yaml, data.json) -> network.build -> engines.wrap ->
Checkpointer.resume -> the loop below -> summary.json.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bnonly_dist import data, dist, engines, network
from bnonly_dist.config import Config, ConfigError
from bnonly_dist.config import plan as plans
from bnonly_dist.config.catalog import num_classes
from bnonly_dist.data.layout import check_num_classes
from bnonly_dist.engines.optim import lr_at
from bnonly_dist.models import memory
from bnonly_dist.models.bn_groups import average_running_statistics
from bnonly_dist.logs import setup_logging
from bnonly_dist.run import finished, history, paths, rundir
from bnonly_dist.run.bn_stats import gamma_stats
from bnonly_dist.run.checkpoint import Checkpointer, complete_checkpoints, fingerprint
from bnonly_dist.run.evaluate import evaluate
from bnonly_dist.run.meter import StepMeter
from bnonly_dist.run.metrics import Metrics
from bnonly_dist.run.stop import StopRequest

log = logging.getLogger(__name__)
QUIET_LIMIT_S = 30.0  # never leave the console silent longer than this, whatever train.log_every says


class Diverged(RuntimeError):
    """The loss became NaN or inf: the run stops without saving over its last good checkpoint."""


class Cadence:
    """When the loop logs and evaluates (checkpoint timing belongs to the Checkpointer)."""

    def __init__(self, cfg: Config, steps_per_epoch: int, end: int):
        self.log_every, self.eval_every = cfg.train.log_every, cfg.train.eval_every
        self.steps_per_epoch, self.end = steps_per_epoch, end
        self.last_line = time.monotonic()

    def log_due(self, step: int) -> bool:
        """A metrics row and log line (identical on every rank: it may run collectives)."""
        return step % self.log_every == 0 or step == self.end

    def console_due(self, first: bool) -> bool:
        """A console line only (rank-local, no collective): the first step, or nothing printed for QUIET_LIMIT_S."""
        return first or time.monotonic() - self.last_line >= QUIET_LIMIT_S

    def printed(self) -> None:
        self.last_line = time.monotonic()

    def eval_due(self, step: int) -> bool:
        epochs, rest = divmod(step, self.steps_per_epoch)
        return rest == 0 and epochs % self.eval_every == 0


def finished_summary(run_paths: paths.RunPaths, cfg: Config) -> dict | None:
    """The summary of a run that already reached its end under cfg (nothing left to do), else None."""
    try:
        summary = json.loads(run_paths.summary.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and finished.reached_end(summary, cfg) else None



def reshard_lines(plan, global_batch: int, old_world: int, world: int) -> list[tuple[int, str]]:
    """(log level, line) on resuming a checkpoint of old_world ranks on world ranks: the data position and the
    BN groups are the global batch's, so the run goes on as one, unless train.bn_batch=null ties the BN
    statistics to each rank's batch."""
    same = f"checkpoint written by {old_world} ranks, resuming on {world}: the same global batches"
    if plan.bn.images is None:
        return [(logging.INFO, same), (logging.WARNING, f"train.bn_batch=null: BN statistics now come from "
                f"{plan.per_rank_batch} images per rank instead of {global_batch // old_world}; set train.bn_batch "
                "to keep them")]
    return [(logging.INFO, f"{same} and the same {plan.bn.describe(plan.per_rank_batch)}")]

class Run:
    """One training run: the pieces built from the config, the loop, checkpoints, summary."""

    def __init__(self, cfg: Config, run_dir: Path | None = None):
        self.cfg, self.ctx = cfg, dist.init(cfg.train.device, cfg.dist.timeout_s, cfg.train.deterministic)
        self.paths = paths.RunPaths(paths.run_dir(cfg, run_dir))
        self.run_dir = self.paths.root
        # Everything that can refuse the run does so before anything is written.
        self.plan = plans.resolve(cfg, self.ctx.device, self.ctx.world, memory)
        # Rank 0 holds the run directory's lock from its one check to the end of the run (the OS
        # drops it if the process dies); claim() creates nothing, create() comes after the data.
        self.lock = self._on_rank0(rundir.claim, cfg, self.run_dir)
        try:
            self.done = dist.broadcast_object(finished_summary(self.paths, cfg) if self.ctx.is_main else None)
            if self.done:
                self.release()
                return
            self.source = data.build(cfg, self.plan, self.ctx.rank, self.ctx.world)
            check_num_classes(cfg.model.num_classes, self.source.num_classes, cfg.data.root or "the synthetic data")
            # What the data set is (not where it lies): rank 0 records and checks it; every rank's checkpoints carry it.
            self.data_record = dist.broadcast_object(self._on_rank0(data.identity_of, cfg, self.source))
            self.lock = self._on_rank0(rundir.create, cfg, self.run_dir, self.lock, self.data_record)
            self._build(cfg)
        except BaseException:
            self.release()
            raise

    def _build(self, cfg: Config) -> None:
        setup_logging(self.run_dir, self.ctx.rank)
        torch.use_deterministic_algorithms(self.plan.deterministic)
        torch.backends.cudnn.benchmark = not self.plan.deterministic

        self.num_classes = num_classes(cfg, self.source)
        # Every rank builds the same frozen weights from the seed; engines may then shard them.
        net = network.build(cfg, self.plan, self.num_classes)
        self.trainable, self.total_params = net.trainable, net.total
        self.engine = engines.wrap(cfg, self.plan, net.model, net.masks, self.ctx)
        if self.plan.compile:
            self.engine.compile()

        self.step = 0
        self.steps_per_epoch = self.source.steps_per_epoch
        self.total = cfg.optim.epochs * self.steps_per_epoch
        self.end = min(self.total, cfg.train.max_steps or self.total)
        self.ckpt = Checkpointer(self.run_dir, self.ctx.rank, self.ctx.world, self.engine, self.source,
                                 net.frozen_sha, every=cfg.train.checkpoint_every, keep=cfg.train.keep_checkpoints,
                                 save_frozen=cfg.dist.save_frozen, steps_per_epoch=self.steps_per_epoch,
                                 identity={**cfg.identity(), rundir.DATA_KEY: self.data_record},
                                 before_save=self.check_finite, clock=self.clock)
        # Training time of the parts before this one (from the checkpoint resumed), and which part this is.
        self.earlier_s, self.parts, self.started = 0.0, 1, time.perf_counter()
        self.cadence = Cadence(cfg, self.steps_per_epoch, self.end)
        self.meter = StepMeter(self.plan.device, cfg.data.batch_size)
        self.evaluations: dict[int, dict] = {}
        self.metrics = Metrics(self.run_dir, self.ctx.is_main)
        self.bar_enabled = cfg.train.progress == "bar" or (cfg.train.progress == "auto" and sys.stdout.isatty())

    def _on_rank0(self, check, *args):
        """Run check on rank 0 only and give every rank its verdict (a ConfigError is raised on all)."""
        refusal, result = None, None
        if self.ctx.is_main:
            try:
                result = check(*args)
            except Exception as err:  # any error (a full disk too) must reach every rank, or they wait forever
                refusal = err
        verdict = dist.broadcast_object(str(refusal) if refusal else None)  # collective (host side)
        if verdict is not None:
            raise refusal or ConfigError(f"rank 0: {verdict}")  # rank 0 keeps the error's class
        return result

    # --- the loop ------------------------------------------------------------------------
    def clock(self) -> tuple[float, int]:
        """(training time over every part so far, parts so far): what each checkpoint records."""
        return self.earlier_s + time.perf_counter() - self.started, self.parts

    def train(self) -> dict:
        if self.done:
            return self.nothing_to_do()
        self.resume()
        self.announce()
        stop = StopRequest(self.cfg.train.stop_check_every)
        shown = self.bar_enabled and self.ctx.is_main
        self.bar = tqdm(total=self.end, initial=self.step, dynamic_ncols=True, disable=not shown)
        # While the bar is shown, console log lines go through it (tqdm.write), each on a line of its own.
        console = logging_redirect_tqdm() if shown else contextlib.nullcontext()
        console.__enter__()  # left in the finally below (a with block would re-indent the loop)
        started = self.started = time.perf_counter()
        first = True
        self.looping = True  # from here a failure has a step (run() leaves it on the error)
        try:
            while self.step < self.end:
                epoch, offset = divmod(self.step, self.steps_per_epoch)
                batches = iter(self.source.train_epoch(epoch, offset))
                while self.step < self.end and (batch := self.meter.next_batch(batches)) is not None:
                    self.train_step(*batch)
                    if self.cadence.log_due(self.step):
                        self.log_train()  # syncs the GPU (.item() of the meter's sums)
                    elif self.cadence.console_due(first):
                        self.log_progress(first)  # syncs the GPU; rank-local, no collective
                    first = False
                    self.ckpt.maybe_save(self.step)  # collective on checkpoint steps
                    if stop.agreed(self.step):  # host-side all-reduce every train.stop_check_every steps
                        return self.stopped(stop)
                if self.cadence.eval_due(self.step):
                    self.evaluate()  # collective: all-reduced sums
        finally:
            stop.close()
            self.bar.close()
            console.__exit__(None, None, None)
        self.ckpt.save(self.step, final=True)  # collective
        final = self.evaluations.get(self.step) or self.evaluate()
        return self.finish(final, time.perf_counter() - started)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        # non_blocking: the copy overlaps the step when the host tensors are pinned (no-op if already on device)
        images = images.to(self.plan.device, non_blocking=True).contiguous(memory_format=self.plan.memory_format)
        labels = labels.to(self.plan.device, non_blocking=True)
        self.engine.set_lr(lr_at(self.step, self.steps_per_epoch, self.cfg.optim))
        loss, top1 = self.engine.train_step(images, labels, self.plan.autocast)  # DDP/FSDP/ZeRO collectives inside
        self.step += 1
        self.meter.add(loss, top1)  # device-side sums: no sync
        self.bar.update(1)

    # --- around the loop -----------------------------------------------------------------
    def resume(self) -> None:
        resumed = self.ckpt.resume()  # collective
        if not resumed:
            return
        self.step = resumed.step
        self.earlier_s, self.parts = resumed.wall_time_s, resumed.parts + 1
        log.info("resumed from %s at step %d", resumed.path, self.step)
        if resumed.world != self.ctx.world:
            for level, line in reshard_lines(self.plan, self.cfg.data.batch_size, resumed.world, self.ctx.world):
                log.log(level, line)

    def announce(self) -> None:
        cfg = self.cfg
        log.info("run %s: %s mode=%s, %d trainable of %d parameters, %d steps/epoch, steps %d -> %d on %s x%d",
                 self.run_dir, cfg.model.arch, cfg.mode, self.trainable, self.total_params, self.steps_per_epoch,
                 self.step, self.end, self.plan.device, self.ctx.world)
        log.info(self.plan.describe())
        log.info(data.describe(cfg, self.plan))
        log.info("this rank holds %d of the %d parameter numbers (%s)", self.engine.local_numel(), self.total_params,
                 self.engine.name)  # collective under FSDP (reshard)

    def evaluate(self) -> dict:
        with self.engine.world_bn_statistics():  # collective: the world's mean of the BN running statistics
            result = evaluate(self.engine.net, self.source.eval_batches(), self.plan.device, self.plan.autocast,
                              self.plan.memory_format)
        bn_params = self.engine.bn_parameters()  # collective under FSDP / ZeRO-3
        result.update(epoch=self.step / self.steps_per_epoch, **gamma_stats(bn_params, self.cfg.train.gamma_threshold))
        self.metrics.log("eval", self.step, result)
        self.metrics.histograms(self.step, bn_params)
        log.info("eval step %d epoch %.2f: top1 %.2f%% top5 %.2f%% loss %.4f (%d images)", self.step,
                 result["epoch"], result["top1"], result["top5"], result["loss"], result["count"])
        self.cadence.printed()
        self.evaluations[self.step] = result
        return result

    def check_finite(self, loss: float | None = None) -> None:
        """Stop a diverged run before it logs or saves NaN (syncs the GPU; host-side all-reduce on every rank)."""
        if loss is None and self.meter.steps == 0:
            return  # nothing trained since the last log line, which checked its loss
        loss = self.meter.report(reset=False)["loss"] if loss is None else loss
        if dist.any_rank(not math.isfinite(loss)):
            # The loss is the mean since the last check (log steps and saves), read then so that a step
            # never waits on the GPU: the first bad step may lie before this one.
            saved = complete_checkpoints(self.run_dir)
            kept = (f"the last good checkpoint {saved[-1]} is kept" if saved else
                    "no checkpoint was saved")
            raise Diverged(f"the training loss became {loss} at or before step {self.step} (diverged); {kept}: "
                           "lower optim.lr or add optim.warmup_epochs and start a new --run-dir")

    def log_train(self) -> None:
        values = self.meter.report(global_batch=True)  # syncs the GPU; collective: the global batch's numbers
        self.check_finite(values["loss"])
        values.update(lr=lr_at(self.step - 1, self.steps_per_epoch, self.cfg.optim),
                      epoch=self.step / self.steps_per_epoch)
        # Watch gammas switch channels off as it happens, not only at evaluations.
        values.update(gamma_stats(self.engine.bn_parameters(), self.cfg.train.gamma_threshold))  # collective if sharded
        self.metrics.log("train", self.step, values)
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.3g}")
        if not self.bar_enabled:
            log.info("step %d/%d epoch %.2f loss %.4f top1 %.1f%% lr %.4g %.0f img/s data-wait %.0f%%", self.step,
                     self.end, values["epoch"], values["loss"], values["top1"], values["lr"],
                     values["images_per_s"], 100 * values["data_wait_frac"])
        self.cadence.printed()

    def log_progress(self, first: bool) -> None:
        """A console line between metric rows (rank-local; the averages go on to the next row)."""
        values = self.meter.report(reset=False)  # syncs the GPU
        what = "first step done (includes warm-up)" if first else "progress"
        log.info("%s: step %d/%d loss %.4f %.0f img/s data-wait %.0f%%", what, self.step, self.end, values["loss"],
                 values["images_per_s"], 100 * values["data_wait_frac"])
        self.cadence.printed()

    def stopped(self, stop: StopRequest) -> dict:
        """All ranks agreed to stop on a signal: save together and leave without a summary."""
        path = self.ckpt.save(self.step, final=True)  # collective
        if self.ctx.is_main:  # for the requeue that may follow (launch/restart.py: a preemption, not a failure)
            history.note_stop(self.run_dir, self.step, stop.signal_name)
        log.warning("stopped at step %d by %s; checkpoint %s; run the same command to resume", self.step,
                    stop.signal_name or "a signal to another rank", path)
        self.close()
        return {"run_dir": str(self.run_dir), "step": self.step, "finished": False, "stopped": True,
                "checkpoint": str(path)}

    def finish(self, final: dict, wall_time_s: float) -> dict:
        average_running_statistics(self.engine.model)  # collective: the final model holds the world's mean
        summary = {"run_dir": str(self.run_dir), "arch": self.cfg.model.arch, "mode": self.cfg.mode,
                   "seed": self.cfg.seed, "dataset": self.cfg.data.name, "step": self.step,
                   "epoch": self.step / self.steps_per_epoch, "finished": self.step >= self.end,
                   "world": self.ctx.world, "engine": self.engine.name, "trainable_params": self.trainable,
                   "num_classes": self.num_classes,
                   "final": final, "fingerprint": fingerprint(self.engine.full_state_dict()),  # collective if sharded
                   "wall_time_s": wall_time_s, "total_wall_time_s": self.earlier_s + wall_time_s, "parts": self.parts}
        if self.ctx.is_main:
            self.paths.summary.write_text(json.dumps(summary, indent=2))
            log.info("done: top1 %.2f%% top5 %.2f%%; summary %s; TensorBoard: %s", final["top1"], final["top5"],
                     self.paths.summary, paths.tensorboard_command(self.run_dir))
        self.close()
        dist.barrier()  # host side: rank 0 has written summary.json
        return summary

    def nothing_to_do(self) -> dict:
        summary = self.done
        if self.ctx.is_main:
            print(f"{self.run_dir}: finished at step {summary['step']} (top-1 {summary['final']['top1']:.2f} %); "
                  "nothing to do (bnonly eval RUN_DIR evaluates it again)", flush=True)
        return summary

    def close(self) -> None:
        """Close metrics and let go of the run directory; safe to call twice, and after a failure."""
        metrics, self.metrics = getattr(self, "metrics", None), None
        if metrics is not None:
            metrics.close()
        self.release()

    def release(self) -> None:
        """Let go of the run directory (also after a failure: a test or notebook may train it again)."""
        lock, self.lock = getattr(self, "lock", None), None
        if lock is not None:
            lock.release()


def run(cfg: Config, run_dir: Path | None = None) -> dict:
    """Train (or resume) one run to its end; returns the summary also written to summary.json."""
    run_ = Run(cfg, run_dir)
    try:
        return run_.train()
    except BaseException as err:
        if getattr(run_, "looping", False):
            with contextlib.suppress(AttributeError):  # for the failure note (cli): where the loop had got to
                err.training_step = run_.step
        raise
    finally:
        run_.close()
