"""The run configuration: a typed, validated, frozen schema loaded from YAML + overrides.

A config file may name a `base:` file (relative to itself) that it extends; mappings are
merged key by key. Overrides are `dotted.key=value` with the value parsed as YAML, so
`optim.lr=0.2`, `mode=bn`, `optim.milestones=[30,60]` and `train.max_steps=null` work.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bnonly_dist.catalog import MODES, parse_arch

# Keys that change how a run is watched, paced or held in memory, not what it computes
# (beyond float rounding): a run directory may be resumed with other values for them, and
# they do not enter its derived name.
NON_IDENTITY_KEYS = frozenset({
    "train.max_steps", "train.log_every", "train.progress", "train.checkpoint_every",
    "train.keep_checkpoints", "train.eval_every", "train.compile", "data.num_threads", "runs_root", "name",
    "dist.timeout_s", "dist.save_frozen", "train.lean_autograd", "train.activation_checkpointing",
    "train.frozen_dtype", "train.stop_check_every",
})


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelConfig(_Section):
    arch: str = "cifar_resnet_20"
    # BN init, OpenLTH's names: uniform (gamma ~ U[0, 1], beta = 0), fixed (1, 0),
    # oneone (1, 1), positivenegative (gamma ~ U[-1, 1], beta = 0).
    bn_init: Literal["uniform", "fixed", "oneone", "positivenegative"] = "uniform"
    num_classes: int | None = Field(default=None, gt=1)  # None: the data set's

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        parse_arch(arch)  # raises ValueError with the reason
        return arch


class DataConfig(_Section):
    name: Literal["cifar10", "imagenet", "synthetic"] = "cifar10"
    root: str | None = None
    batch_size: int = Field(default=128, gt=0)  # global, over all ranks
    eval_batch_size: int = Field(default=256, gt=0)  # global
    decode: Literal["auto", "cpu", "mixed"] = "auto"  # DALI JPEG decode; auto = mixed on GPU
    num_threads: int = Field(default=4, gt=0)  # DALI CPU threads per rank
    image_size: int = Field(default=224, gt=0)  # ImageNet train/eval crop
    resize_size: int = Field(default=256, gt=0)  # ImageNet eval resize before crop
    min_area: float = Field(default=0.1, gt=0, le=1)  # RandomResizedCrop scale
    # synthetic data (benchmarks): samples per epoch and image shape
    synthetic_samples: int = Field(default=1024, gt=0)
    synthetic_image_size: int = Field(default=32, gt=0)
    synthetic_classes: int = Field(default=10, gt=1)


class OptimConfig(_Section):
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=1e-4, ge=0)
    epochs: int = Field(default=160, gt=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = [80, 120]  # epochs where lr is multiplied by lr_decay
    lr_decay: float = Field(default=0.1, gt=0, le=1)
    warmup_epochs: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _milestones_sorted(self) -> "OptimConfig":
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ValueError("milestones must be positive epochs in increasing order")
        return self


class TrainConfig(_Section):
    max_steps: int | None = Field(default=None, gt=0)  # cap on optimizer steps (smoke runs)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU
    channels_last: bool | Literal["auto"] = "auto"  # auto: true on GPU
    compile: bool = False
    deterministic: bool = False
    log_every: int = Field(default=50, gt=0)  # steps between metric lines
    eval_every: int = Field(default=1, gt=0)  # epochs between evaluations
    checkpoint_every: int = Field(default=1000, gt=0)  # steps between checkpoints
    keep_checkpoints: int = Field(default=2, gt=0)
    gamma_threshold: float = Field(default=0.01, gt=0)  # |gamma| below this = channel off
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a bar on a terminal
    # Steps between the ranks' agreement on a stop signal (a host-side all-reduce); all
    # ranks still stop after the same step.
    stop_check_every: int = Field(default=10, gt=0)
    # Frozen convolutions save only their weight, BN(+ReLU) its input and a 1-bit ReLU mask
    # (models/layers.py). auto: on for modes whose convolutions are frozen.
    lean_autograd: bool | Literal["auto"] = "auto"
    # Residual stages (1 = layer1) recomputed in backward instead of keeping their
    # activations; same bits, about one extra forward (for ResNet-866, ResNet-200 at large batch).
    activation_checkpointing: list[int] = []
    # bf16: frozen conv/linear weights stored in bf16 (half the memory and FSDP all-gather
    # bytes); needs bf16 autocast, i.e. train.precision=bf16 or auto on a GPU.
    frozen_dtype: Literal["fp32", "bf16"] = "fp32"

    @field_validator("activation_checkpointing")
    @classmethod
    def _stages_valid(cls, stages: list[int]) -> list[int]:
        if any(s < 1 or s > 4 for s in stages) or len(set(stages)) != len(stages):
            raise ValueError("must list distinct residual stages between 1 and 4, e.g. [1, 2]")
        return sorted(stages)


class DistConfig(_Section):
    # ddp: replicate, all-reduce the (tiny) BN gradients. fsdp: FSDP2 fully_shard per
    # fsdp_unit, frozen weights sharded too. deepspeed: ZeRO zero_stage (3 shards all weights).
    engine: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp_unit: Literal["block", "stage"] = "block"  # residual block or whole stage per shard group
    zero_stage: Literal[1, 2, 3] = 1
    timeout_s: int = Field(default=600, gt=0)  # a collective waiting longer fails the run (dead/hung rank)
    save_frozen: bool = False  # also store frozen weights (else regenerated from the seed and verified)


class Config(_Section):
    mode: Literal[tuple(MODES)] = "bn"  # type: ignore[valid-type]  # see modes.py
    seed: int = 0
    runs_root: str = "runs"
    name: str | None = None  # run name; None derives one from the hyperparameters
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    dist: DistConfig = DistConfig()

    @model_validator(mode="after")
    def _train_options_fit(self) -> "Config":
        stages = 3 if parse_arch(self.model.arch).family == "cifar" else 4
        if any(s > stages for s in self.train.activation_checkpointing):
            raise ValueError(f"train.activation_checkpointing lists a stage {self.model.arch} does not have; "
                             f"its residual stages are 1 to {stages}")
        if self.train.frozen_dtype == "bf16" and self.train.precision == "fp32":
            raise ValueError("train.frozen_dtype=bf16 needs bf16 autocast; set train.precision=bf16 (or auto on a GPU)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def identity(self) -> dict[str, Any]:
        """The flattened keys that determine what the run computes."""
        flat = {}
        for section, value in self.to_dict().items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for key, leaf in items:
                dotted = f"{section}.{key}" if key else section
                if dotted not in NON_IDENTITY_KEYS:
                    flat[dotted] = leaf
        return flat

    def run_name(self) -> str:
        """A directory name derived from the hyperparameters (OpenLTH style)."""
        if self.name:
            return self.name
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()
        return f"{self.data.name}_{self.model.arch}_{self.mode}_seed{self.seed}_{digest[:8]}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_mapping(path: Path, missing: str) -> dict:
    """A YAML file holding a mapping (empty file: {}); ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(missing)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of keys, not {type(data).__name__}")
    return data


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base files form a cycle; remove the loop of `base:` keys")
    data = read_mapping(path, f"config file {path} does not exist; pass a path to a YAML file in configs/")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / base, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. optim.lr=0.2")
    key, raw = text.split("=", 1)
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {text!r} has a malformed key; write e.g. optim.lr=0.2")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def parse_args(parser, argv=None):
    """parser.parse_args for commands taking `overrides`, which may also follow the options."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _key(loc: tuple) -> str:
    """The dotted config key of an error location (without list indices or union member tags)."""
    section, parts = Config, []
    for part in loc:
        fields = getattr(section, "model_fields", {})
        if part not in fields:
            break
        parts.append(part)
        section = fields[part].annotation
    return ".".join(parts) or str(loc[0])


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    if not first["loc"]:  # a check across sections: its message names the keys
        return first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        key = ".".join(str(p) for p in first["loc"])
        return f"unknown config key '{key}'; check its spelling against bnonly_dist/config.py"
    key = _key(first["loc"])
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"config key '{key}': {first['msg']}{shown}; fix it in the YAML or with {key}=..."


def from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data = _read_yaml(Path(path)) if path is not None else {}
    return from_dict(apply_overrides(data, list(overrides)))


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
