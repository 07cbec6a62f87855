"""One bench variant in its own process: the network `bnonly train` would build, one step at a time.

bench.py conducts: it starts one process per variant (spawn) running serve(), then sends
"step" to each in turn. largest_batch() searches the largest batch that fits (GPU).
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from bnonly_dist import models, network
from bnonly_dist.config import Config, ConfigError
from bnonly_dist.config.catalog import num_classes
from bnonly_dist.config.plan import Plan, resolve
from bnonly_dist.dist import choose_device
from bnonly_dist.engines.base import Engine
from bnonly_dist.models import memory
from bnonly_dist.engines.optim import make_optimizer

DELAY_ENV = "BNONLY_BENCH_DELAY"  # test hook: "variant=seconds" sleeps inside that variant's timed step

# Allocation failures that reach Python as plain RuntimeErrors (cuBLAS handles, cuDNN
# workspaces) rather than torch.cuda.OutOfMemoryError.
_ALLOC_FAILURES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS")


class VariantFailed(RuntimeError):
    """A variant's process failed or died: the message names it."""



def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA allocation failure, however the library reports it."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in _ALLOC_FAILURES))


def variant_plan(cfg: Config, device: torch.device, variant: str) -> tuple[str, Plan]:
    """(mode, plan) a variant runs."""
    if variant == "all":
        return "all", resolve(cfg.model_copy(update={"mode": "all"}), device, memory=memory)
    plan = resolve(cfg, device, memory=memory)
    if variant == "naive":
        return cfg.mode, replace(plan, lean=False, lean_why="the naive variant", channels_last=False,
                                 checkpointed_stages=(), frozen_dtype=None)
    return cfg.mode, replace(plan, lean=variant == "bn-lean", lean_why=f"the {variant} variant")


def saved_activation_bytes(model: torch.nn.Module, images, labels, autocast) -> int:
    """Bytes autograd keeps for backward (unique storages, parameters excluded)."""
    with memory.saved_storages(model) as kept, autocast():
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
    del loss
    return sum(size for size, _ in kept.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU sync: a step's time includes its kernels


class Runner:
    """One variant in its process: the network, one synthetic batch, one step at a time."""

    def __init__(self, cfg: Config, variant: str, batch: int):
        self.cfg, self.variant = cfg, variant
        self.device = choose_device(cfg.train.device, 0)
        torch.use_deterministic_algorithms(cfg.train.deterministic)  # as train sets them
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        self.mode, self.plan = variant_plan(cfg, self.device, variant)
        self.size = 32 if models.parse_arch(cfg.model.arch).family == "cifar" else cfg.data.image_size
        self.classes = num_classes(cfg)
        generator = torch.Generator().manual_seed(cfg.seed)
        images = torch.randn(batch, 3, self.size, self.size, generator=generator)
        self.labels = torch.randint(0, self.classes, (batch,), generator=generator).to(self.device)
        self.images = images.to(self.device).contiguous(memory_format=self.plan.memory_format)
        net = network.build(cfg, self.plan, self.classes, mode=self.mode, lean=self.plan.lean)
        self.trainable = net.trainable
        self.engine = Engine(net.model, make_optimizer(net.model, net.masks, cfg.optim), net.masks,
                             cfg.optim.weight_decay)
        if cfg.train.compile:
            self.engine.compile()
        name, _, delay = os.environ.get(DELAY_ENV, "").partition("=")
        self.delay = float(delay) if name == variant else 0.0

    def step(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.engine.train_step(self.images, self.labels, self.plan.autocast)
        sync(self.device)
        if self.delay:
            time.sleep(self.delay)
        return time.perf_counter() - start

    def extras(self) -> dict:
        """FLOPs, saved bytes and memory of one step (after the timed ones)."""
        on_gpu = self.device.type == "cuda"
        model, labels = self.engine.model, self.labels
        peak = torch.cuda.max_memory_allocated(self.device) if on_gpu else None
        reserved = torch.cuda.max_memory_reserved(self.device) if on_gpu else None
        with FlopCounterMode(display=False) as counter:
            self.engine.train_step(self.images, labels, self.plan.autocast)
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        saved = saved_activation_bytes(model, self.images, labels, self.plan.autocast)
        return {"variant": self.variant, "mode": self.mode, "lean": self.plan.lean,
                "channels_last": self.plan.channels_last, "trainable_params": self.trainable,
                "flops_per_step": counter.get_total_flops(), "saved_activation_bytes": saved,
                "saved_activation_bytes_per_image": saved / len(labels),
                "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "grad_and_momentum_bytes": grad_bytes * (2 if self.cfg.optim.momentum > 0 else 1),
                "peak_memory_bytes": peak, "peak_reserved_bytes": reserved}


def serve(conn, cfg: Config, variant: str, batch: int) -> None:
    """A variant's process: build, then answer "step" and "finish" from the conductor."""
    try:
        runner = Runner(cfg, variant, batch)
        # One untimed step before any turn: cuDNN autotunes this variant's kernels here, not in a round.
        runner.engine.train_step(runner.images, runner.labels, runner.plan.autocast)
        conn.send(("ready", None))
        while (command := conn.recv()) != "finish":
            if command == "step":
                conn.send(("step", runner.step()))
            elif runner.device.type == "cuda":  # "reset": warm-up is over
                torch.cuda.reset_peak_memory_stats(runner.device)
        conn.send(("done", runner.extras()))
    except Exception as err:  # noqa: BLE001 - the conductor reports it with the variant's name
        conn.send(("oom" if is_out_of_memory(err) else "error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def answer(conn, variant: str):
    try:
        kind, value = conn.recv()
    except EOFError:
        raise VariantFailed(f"bench variant {variant}: its process died (killed for memory?); "
                            "try a smaller data.batch_size") from None
    if kind == "oom":
        raise ConfigError(f"bench variant {variant} does not fit in device memory beside the other variants; "
                          "pass fewer --variants or a smaller data.batch_size")
    if kind == "error":
        raise VariantFailed(f"bench variant {variant}: {value}")
    return value


def largest_batch(step, start: int, limit: int) -> int:
    """The largest batch (a multiple of 8) for which step(batch) fits in memory.

    step runs one training step and raises on failure; allocation failures count as "does
    not fit" and the memory is freed before the next try."""
    def fits(size: int) -> bool:
        try:
            step(size)
            return True
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
        finally:
            gc.collect()  # the failed step's tensors, held by the traceback's frames until now
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        return False

    good, bad = 0, start
    while bad <= limit and fits(bad):
        good, bad = bad, 2 * bad
    bad = min(bad, limit + 8)
    while bad - good > 8:
        middle = (good + bad) // 16 * 8
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def search_batch(cfg: Config, variant: str, limit: int) -> int:
    runner = Runner(cfg, variant, 8)
    # Whether a batch fits, not how fast it runs: cuDNN's autotuning at every new batch size
    # would cost seconds per try (torch sizes the autotuner's workspaces to the memory left).
    torch.backends.cudnn.benchmark = False

    def step(size: int) -> None:
        runner.images = runner.labels = None
        # Made on the device: a batch of 4096 ImageNet images is 2.5 GB to draw on the host and copy
        generator = torch.Generator(runner.device).manual_seed(cfg.seed)
        runner.labels = torch.randint(0, runner.classes, (size,), generator=generator, device=runner.device)
        runner.images = torch.empty(size, 3, runner.size, runner.size, device=runner.device,
                                    memory_format=runner.plan.memory_format).normal_(generator=generator)
        try:
            runner.step()
        finally:
            runner.engine.optimizer.zero_grad(set_to_none=True)

    return largest_batch(step, cfg.data.batch_size, limit)
