"""The Plan: every device-dependent or "auto" setting of a run, resolved once.

Built from (config, device, world) right after dist.init, logged on one line at start, and read
by train, bench, bench-checkpoint, eval and analysis alike. Nothing downstream looks at
an "auto" value again. Rules across config keys that do not depend on the device live in
the config validator (config.py); the ones that do are checked here, before any data or
model is built.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from bnonly_dist.config import Config, ConfigError
from bnonly_dist.config.catalog import ENGINES, freezes_convolutions, num_classes
from bnonly_dist.rendezvous import ranks_on_this_host


@dataclass(frozen=True)
class BNGroups:
    """How one rank forms BN statistics: `per_rank` groups inside it, or one group spread over `ranks` ranks."""
    images: int | None  # images per statistic; None: the rank's own batch (depends on the world)
    per_rank: int = 1
    ranks: int = 1

    def describe(self, per_rank_batch: int, ranks_per_node: int = 0) -> str:
        """One line for the plan; ranks_per_node (0: unknown) tells whether a group spans nodes."""
        if self.images is None:
            return (f"BN statistics over each rank's {per_rank_batch} images (train.bn_batch=null: they change "
                    "with the number of ranks)")
        if self.ranks > 1:
            line = f"BN statistics over {self.images} images: synchronised over {self.ranks} ranks"
            if ranks_per_node and (self.ranks > ranks_per_node or ranks_per_node % self.ranks):
                line += (f" across nodes ({ranks_per_node} ranks per node): each BN layer's 2 small collectives per "
                         "step cross the network (tens of us each over InfiniBand, a few us over NVLink)")
            return line
        if self.per_rank > 1:
            return f"BN statistics over {self.images} images: {self.per_rank} groups per rank"
        return f"BN statistics over {self.images} images: one group per rank"


@dataclass(frozen=True)
class Plan:
    device: torch.device
    bf16: bool  # bf16 autocast for forward and backward
    channels_last: bool  # NHWC activations and weights
    lean: bool  # lean autograd for frozen layers (models/layers.py)
    lean_why: str  # what decided lean (the auto rule's estimate, or the key)
    checkpointed_stages: tuple[int, ...]  # residual stages recomputed in backward
    frozen_dtype: torch.dtype | None  # storage dtype of frozen conv/linear weights; None = fp32 (auto: bf16 under bf16
    # autocast, which caches casts only of tensors that require grad: fp32 frozen weights were cast at every forward)
    decode: str | None  # DALI JPEG decode (cpu | mixed) for ImageNet; None for other data
    engine: str  # ddp | fsdp | deepspeed
    compile: bool
    deterministic: bool
    bn: BNGroups  # over how many images, and where, every BN statistic is computed
    per_rank_batch: int

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self):
        """A fresh autocast context for one forward (bf16) or a no-op (fp32)."""
        return torch.autocast(self.device.type, torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def describe(self) -> str:
        frozen = "bf16" if self.frozen_dtype == torch.bfloat16 else "fp32"
        stages = ",".join(map(str, self.checkpointed_stages)) or "none"
        return (f"plan: device {self.device}, {self.precision}, channels_last {self.channels_last}, "
                f"lean autograd {self.lean} ({self.lean_why}), checkpointed stages {stages}, frozen weights {frozen}, "
                f"decode {self.decode or 'n/a'}, engine {self.engine}, compile {self.compile}, "
                f"deterministic {self.deterministic}; {self.bn.describe(self.per_rank_batch, _ranks_per_node())}")


def _ranks_per_node() -> int:
    """Ranks per node as the launcher states it (torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node), else 0."""
    stated = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    return ranks_on_this_host() if any(os.environ.get(key) for key in stated) else 0


def default_channels_last(device: torch.device, engine: str = "ddp") -> bool:
    """train.channels_last=auto: NHWC on GPU (cuDNN's fast layout for bf16) and on the CPU
    (oneDNN: on 2 CPU cores BN-only steps of CIFAR ResNet-110 and ResNet-50 ran faster in
    NHWC than in NCHW, docs/benchmarks.md). Measured with ddp only: FSDP2 and DeepSpeed keep
    their weights NCHW (engines/base.contiguous_parameters), so auto leaves them NCHW; an
    explicit true still gives them channels_last activations."""
    return device.type in ("cuda", "cpu") and ENGINES[engine].channels_last_auto


# train.lean_autograd=auto turns the lean path on when plain autograd's saved activations
# would take more than this share of a rank's memory. Below it plain autograd is faster:
# on the CPU its BN-only step took 0.92x the time of the lean one (CIFAR ResNet-110,
# docs/benchmarks.md); the lean path costs a pack and an unpack of each ReLU mask.
LEAN_MEMORY_SHARE = 0.5


def default_lean(cfg: Config, device: torch.device, world: int, bf16: bool, channels_last: bool,
                 memory=None) -> tuple[bool, str]:
    """train.lean_autograd=auto: (on?, why) — on where the mode freezes the convolutions and
    plain autograd would keep more than LEAN_MEMORY_SHARE of the rank's memory (memory: the estimate,
    models.memory, passed in from above; None: unknown, which turns the lean path on)."""
    if not freezes_convolutions(cfg.mode):
        return False, "the mode trains convolutions"
    have = memory.rank_memory_bytes(device) if memory is not None else None
    if have is None:
        return True, "memory of the device unknown here"
    need = memory.plain_saved_bytes(cfg.model.arch, num_classes(cfg), cfg.mode, max(1, cfg.data.batch_size // world),
                                    cfg.data.image_size, channels_last, tuple(cfg.train.activation_checkpointing), bf16)
    on = need > LEAN_MEMORY_SHARE * have
    return on, (f"plain autograd keeps {need / 2**30:.1f} GiB of the rank's {have / 2**30:.0f} GiB, "
                f"{'more' if on else 'not more'} than {LEAN_MEMORY_SHARE:.0%}")


def per_rank(global_batch: int, world: int) -> int:
    """Each rank's share of the global training batch (data.batch_size)."""
    if global_batch % world:
        raise ConfigError(f"data.batch_size={global_batch} is the global batch and must divide by the "
                         f"world size {world}; choose a multiple of {world}")
    return global_batch // world


def bn_groups(bn_batch: int | None, global_batch: int, world: int) -> BNGroups:
    """train.bn_batch on this world: groups inside a rank, or ranks sharing a group; ConfigError
    naming the values that work when n images fit neither way."""
    b = per_rank(global_batch, world)
    if bn_batch is None:
        return BNGroups(None)
    if b % bn_batch == 0:
        return BNGroups(bn_batch, per_rank=b // bn_batch)
    if bn_batch % b == 0 and global_batch % bn_batch == 0:
        return BNGroups(bn_batch, ranks=bn_batch // b)
    works = sorted({d for d in range(1, b + 1) if b % d == 0} | {m for m in range(b, global_batch + 1, b)
                                                                   if global_batch % m == 0})
    raise ConfigError(f"train.bn_batch={bn_batch} cannot be formed from the global batch {global_batch} on {world} "
                      f"rank{'s' if world > 1 else ''} ({b} images per rank); use one of {works} (or null: each "
                      "rank's own batch)")


def resolve(cfg: Config, device: torch.device, world: int = 1, memory=None) -> Plan:
    """The Plan of cfg on device for one of world ranks; ConfigError naming the key if the
    device cannot run it. memory: the estimate train.lean_autograd=auto asks (models.memory: a
    module above this floor, so its callers pass it in; None decides as on a device of unknown
    memory: lean)."""
    train, on_gpu = cfg.train, device.type == "cuda"
    bf16 = train.precision == "bf16" or (train.precision == "auto" and on_gpu)
    if train.frozen_dtype == "bf16" and not bf16:  # precision=fp32 is refused by the validator already
        raise ConfigError("train.frozen_dtype=bf16 needs bf16 autocast, which is off on the CPU by default; "
                          "set train.precision=bf16")
    channels_last = (default_channels_last(device, cfg.dist.engine) if train.channels_last == "auto"
                     else train.channels_last)
    if train.lean_autograd == "auto":
        lean, lean_why = default_lean(cfg, device, world, bf16, channels_last, memory)
    else:
        lean, lean_why = train.lean_autograd, "train.lean_autograd"
    decode = None
    if cfg.data.name == "imagenet":
        decode = cfg.data.decode if cfg.data.decode != "auto" else ("mixed" if on_gpu else "cpu")
        if decode == "mixed" and not on_gpu:
            raise ConfigError("data.decode=mixed decodes on the GPU but this run is on the CPU; use data.decode=cpu")
    return Plan(device=device, bf16=bf16, channels_last=channels_last, lean=lean, lean_why=lean_why,
                checkpointed_stages=tuple(train.activation_checkpointing),
                frozen_dtype=torch.bfloat16 if train.frozen_dtype == "bf16" or (train.frozen_dtype == "auto" and bf16)
                else None, decode=decode,
                engine=cfg.dist.engine, compile=train.compile, deterministic=train.deterministic,
                bn=bn_groups(train.bn_batch, cfg.data.batch_size, world),
                per_rank_batch=per_rank(cfg.data.batch_size, world))
