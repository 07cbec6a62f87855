"""What a run can train, as plain data (no torch, so the CLI and the config load fast).

Architectures, OpenLTH's names: cifar_resnet_N (N = 6n+2) and cifar_resnet_N_W (W = base
width, 16 by default: cifar_resnet_14_64 is WRN-14-4); imagenet_resnet_D and
imagenet_resnet_D_W (W = base width, 64 by default, torchvision's).

Engines (dist.engine) are a table too: ENGINES, read by the schema, the plan, engines.wrap,
the bench and the analysis.

Modes name the parameter roles that learn (see models.parameter_roles). Two add to that:
bn_fixed pins every BN to gamma = 1, beta = 0 (frozen), and random_per_channel learns k
random weights per output channel of every convolution, k = 2 so that the count equals
the BN parameter count (2 per channel). modes.py applies them to a model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

# ImageNet depth -> (block kind, residual blocks per stage), He et al. 2016 / torchvision.
STAGE_BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


class Arch(NamedTuple):
    family: str  # cifar | imagenet
    depth: int
    width: int

    @property
    def stages(self) -> int:
        return 3 if self.family == "cifar" else 4


_ARCH = re.compile(r"^(cifar|imagenet)_resnet_(\d+)(?:_(\d+))?$")
ARCH_FORMS = "cifar_resnet_N[_W] (N = 6n+2) or imagenet_resnet_D[_W] (D in 18, 34, 50, 101, 152, 200)"


def parse_arch(name: str) -> Arch:
    """The one place that decides whether an architecture name is valid (ValueError with the reason)."""
    match = _ARCH.match(name)
    if not match:
        raise ValueError(f"unknown architecture {name!r}: use cifar_resnet_N[_W] or imagenet_resnet_D[_W]")
    family, depth, width = match.group(1), int(match.group(2)), match.group(3)
    width = int(width) if width else (16 if family == "cifar" else 64)
    if width < 1:
        raise ValueError(f"{name}: width must be positive")
    if family == "cifar" and ((depth - 2) % 6 or depth < 8):
        raise ValueError(f"{name}: CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    if family == "imagenet" and depth not in STAGE_BLOCKS:
        raise ValueError(f"{name}: ImageNet ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
    return Arch(family, depth, width)


@dataclass(frozen=True)
class Mode:
    trains: frozenset[str]
    bn_fixed: bool = False
    random_per_channel: int = 0


MODES = {
    "all": Mode(frozenset({"conv", "shortcut", "bn", "output"})),
    "bn": Mode(frozenset({"bn"})),
    "bn_output": Mode(frozenset({"bn", "output"})),
    "bn_shortcut_output": Mode(frozenset({"bn", "shortcut", "output"})),
    "shortcut_output": Mode(frozenset({"shortcut", "output"})),
    "output": Mode(frozenset({"output"})),
    "none": Mode(frozenset()),
    "random_per_channel": Mode(frozenset(), random_per_channel=2),
    "bn_fixed": Mode(frozenset({"conv", "shortcut", "output"}), bn_fixed=True),
}


def freezes_convolutions(mode_name: str) -> bool:
    """Whether the mode leaves every 3x3/1x1 body convolution frozen (where the lean path can apply)."""
    mode = MODES[mode_name]
    return "conv" not in mode.trains and not mode.random_per_channel


def masks_gradients(mode_name: str) -> bool:
    """Whether the mode trains parts of tensors (element masks on gradients)."""
    return MODES[mode_name].random_per_channel > 0


def trains_nothing(mode_name: str) -> bool:
    mode = MODES[mode_name]
    return not mode.trains and not mode.random_per_channel


@dataclass(frozen=True)
class Engine:
    """A dist.engine: where its class lives (engines.wrap builds it) and what it supports."""
    cls: str  # "module:Class" under bnonly_dist.engines
    help: str
    masked_gradients: str | None = None  # None: runs modes that mask gradients inside tensors; else why not
    trains_nothing: str | None = None  # None: runs a mode that trains nothing; else why not
    channels_last_auto: bool = False  # train.channels_last=auto gives NHWC (measured with ddp only; FSDP2 and
    # DeepSpeed keep their weights NCHW, engines/base.contiguous_parameters)
    benched: bool = False  # `bnonly bench` times its per-rank step in one process
    dcp: bool = True  # checkpoints in DCP form: any world size resumes them, the analysis reads them


ENGINES = {
    "ddp": Engine("ddp:DDPEngine", "replicate, all-reduce the (tiny) BN gradients", channels_last_auto=True,
                  benched=True),
    "fsdp": Engine("fsdp:FSDPEngine", "FSDP2 fully_shard per fsdp_unit, frozen weights sharded too"),
    "deepspeed": Engine("deepspeed:DeepSpeedEngine", "ZeRO zero_stage (3 shards all weights)",
                        masked_gradients="ZeRO's flat buffers do not allow",
                        trains_nothing="there is nothing for ZeRO to do", dcp=False),
}


def engines_with(feature: str) -> list[str]:
    """The engines that support feature (an Engine field that holds why not, None where supported)."""
    return [name for name, engine in ENGINES.items() if getattr(engine, feature) is None]


DEFAULT_CLASSES = {"cifar": 10, "imagenet": 1000}  # the data set each family was made for


def num_classes(cfg, source=None) -> int:
    """The class count of a Config: model.num_classes if set, else the data source's count, else the architecture family's
    data set's (CIFAR-10: 10, ImageNet: 1000; what bench and bench-checkpoint build without data)."""
    if cfg.model.num_classes:
        return cfg.model.num_classes
    if source is not None:
        return source.num_classes
    return DEFAULT_CLASSES[parse_arch(cfg.model.arch).family]
