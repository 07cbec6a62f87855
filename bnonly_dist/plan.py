"""The Plan: every device-dependent or "auto" setting of a run, resolved once.

Built from (config, device) right after dist.init, logged on one line at start, and read
by train, bench, bench-checkpoint, eval and analysis alike. Nothing downstream looks at
an "auto" value again. Rules across config keys that do not depend on the device live in
the config validator (config.py); the ones that do are checked here, before any data or
model is built.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from bnonly_dist import modes
from bnonly_dist.config import Config, ConfigError


@dataclass(frozen=True)
class Plan:
    device: torch.device
    bf16: bool  # bf16 autocast for forward and backward
    channels_last: bool  # NHWC activations and weights
    lean: bool  # lean autograd for frozen layers (models/layers.py)
    checkpointed_stages: tuple[int, ...]  # residual stages recomputed in backward
    frozen_dtype: torch.dtype | None  # storage dtype of frozen conv/linear weights; None = fp32
    decode: str | None  # DALI JPEG decode (cpu | mixed) for ImageNet; None for other data
    engine: str  # ddp | fsdp | deepspeed
    compile: bool
    deterministic: bool

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
                f"lean autograd {self.lean}, checkpointed stages {stages}, frozen weights {frozen}, "
                f"decode {self.decode or 'n/a'}, engine {self.engine}, compile {self.compile}, "
                f"deterministic {self.deterministic}")


def default_channels_last(device: torch.device, engine: str = "ddp") -> bool:
    """train.channels_last=auto: NHWC on GPU (cuDNN's fast layout for bf16) and on the CPU
    (oneDNN: on 2 CPU cores BN-only steps of CIFAR ResNet-110 and ResNet-50 ran faster in
    NHWC than in NCHW, docs/benchmarks.md). Measured with ddp only: FSDP2 and DeepSpeed keep
    their weights NCHW (engines/base.contiguous_parameters), so auto leaves them NCHW; an
    explicit true still gives them channels_last activations."""
    return device.type in ("cuda", "cpu") and engine == "ddp"


def default_lean(mode: str) -> bool:
    """train.lean_autograd=auto: on where the mode leaves the convolutions frozen."""
    return modes.freezes_convolutions(mode)


def resolve(cfg: Config, device: torch.device) -> Plan:
    """The Plan of cfg on device; ConfigError naming the key if the device cannot run it."""
    train, on_gpu = cfg.train, device.type == "cuda"
    bf16 = train.precision == "bf16" or (train.precision == "auto" and on_gpu)
    if train.frozen_dtype == "bf16" and not bf16:  # precision=fp32 is refused by the validator already
        raise ConfigError("train.frozen_dtype=bf16 needs bf16 autocast, which is off on the CPU by default; "
                          "set train.precision=bf16")
    channels_last = (default_channels_last(device, cfg.dist.engine) if train.channels_last == "auto"
                     else train.channels_last)
    lean = default_lean(cfg.mode) if train.lean_autograd == "auto" else train.lean_autograd
    decode = None
    if cfg.data.name == "imagenet":
        decode = cfg.data.decode if cfg.data.decode != "auto" else ("mixed" if on_gpu else "cpu")
        if decode == "mixed" and not on_gpu:
            raise ConfigError("data.decode=mixed decodes on the GPU but this run is on the CPU; use data.decode=cpu")
    return Plan(device=device, bf16=bf16, channels_last=channels_last, lean=lean,
                checkpointed_stages=tuple(train.activation_checkpointing),
                frozen_dtype=torch.bfloat16 if train.frozen_dtype == "bf16" else None, decode=decode,
                engine=cfg.dist.engine, compile=train.compile, deterministic=train.deterministic)
