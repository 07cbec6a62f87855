"""The run configuration: a typed, validated, frozen schema (loading.py reads it from YAML + overrides)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bnonly_dist.config.catalog import ARCH_FORMS, ENGINES, MODES, engines_with, masks_gradients, parse_arch, trains_nothing

# Keys that change how a run is watched, paced or held in memory, or where its data lies, not
# what it computes (beyond float rounding): a run directory may be resumed with other values
# for them, and they do not enter its derived name. What the data *is* (data/identity.py) is
# recorded with the run and checked on resume instead of data.root.
NON_IDENTITY_KEYS = frozenset({"data.root",
    "train.max_steps", "train.log_every", "train.progress", "train.checkpoint_every",
    "train.keep_checkpoints", "train.eval_every", "train.compile", "data.num_threads", "runs_root", "name",
    "dist.timeout_s", "dist.save_frozen", "train.lean_autograd", "train.activation_checkpointing",
    "train.frozen_dtype", "train.stop_check_every",
})


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and the fix."""


def _field(default, description: str, *, only_for: tuple[str, ...] = (), **limits):
    """A config key: its default, its documentation (shown by `bnonly config` and docs/config.md)
    and, for data keys, the data sets it applies to (others leave it out of config.yaml)."""
    extra = {"only_for": list(only_for)} if only_for else None
    return Field(default=default, description=description, json_schema_extra=extra, **limits)


class _Section(BaseModel):
    # strict: no silent str->int coercion; allow_inf_nan: inf/nan are never a valid setting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ModelConfig(_Section):
    arch: str = _field("cifar_resnet_20", f"architecture: {ARCH_FORMS}; `bnonly model-info ARCH` counts its parameters")
    bn_init: Literal["uniform", "fixed", "oneone", "positivenegative"] = _field(
        "uniform", "BN init, OpenLTH's names: uniform (gamma ~ U[0, 1], beta = 0), fixed (1, 0), oneone (1, 1), "
        "positivenegative (gamma ~ U[-1, 1], beta = 0)")
    num_classes: int | None = _field(None, "output classes; null: the data set's (must cover every label)", gt=1)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        parse_arch(arch)  # raises ValueError with the reason
        return arch


_IMAGENET, _SYNTHETIC = ("imagenet",), ("synthetic",)


class DataConfig(_Section):
    name: Literal["cifar10", "imagenet", "synthetic"] = _field(
        "cifar10", "data set: cifar10 (cifar-10-batches-py, held on the device), imagenet (class folders of JPEGs, "
        "read by DALI), synthetic (random tensors, for benchmarks)")
    root: str | None = _field(None, "folder holding the data set (cifar10: the folder with cifar-10-batches-py/; "
                              "imagenet: the folder with train/ and val/)")
    batch_size: int = _field(128, "global training batch over all ranks (each rank takes batch_size / world)", gt=0)
    eval_batch_size: int = _field(256, "global evaluation batch over all ranks", gt=0)
    decode: Literal["auto", "cpu", "mixed"] = _field(
        "auto", "DALI JPEG decode: mixed (on the GPU), cpu; auto = mixed on a GPU", only_for=_IMAGENET)
    num_threads: int | Literal["auto"] = _field(
        "auto", "DALI CPU threads per rank; auto: the CPUs of the task (SLURM_CPUS_PER_TASK, else the cores this "
        "process may use divided by the ranks on its node)", only_for=_IMAGENET)
    image_size: int = _field(224, "training crop and evaluation crop side", gt=0, only_for=_IMAGENET)
    resize_size: int = _field(256, "evaluation resize (shorter side) before the centre crop", gt=0,
                              only_for=_IMAGENET)
    min_area: float = _field(0.1, "RandomResizedCrop's smallest area fraction", gt=0, le=1, only_for=_IMAGENET)
    synthetic_samples: int = _field(1024, "synthetic images per epoch", gt=0, only_for=_SYNTHETIC)
    synthetic_image_size: int = _field(32, "synthetic image side", gt=0, only_for=_SYNTHETIC)
    synthetic_classes: int = _field(10, "synthetic label count", gt=1, only_for=_SYNTHETIC)

    @field_validator("num_threads")
    @classmethod
    def _threads_positive(cls, threads: int | str) -> int | str:
        if threads != "auto" and threads < 1:
            raise ValueError("must be a positive count of threads or auto")
        return threads


class OptimConfig(_Section):
    lr: float = _field(0.1, "peak learning rate of SGD (for the global batch)", gt=0)
    momentum: float = _field(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = _field(False, "Nesterov momentum")
    weight_decay: float = _field(1e-4, "L2 weight decay on the parameters that learn", ge=0)
    epochs: int = _field(160, "training length in epochs", gt=0)
    schedule: Literal["step", "cosine", "constant"] = _field(
        "step", "lr schedule after warm-up: step (x lr_decay at each milestone), cosine (to 0), constant")
    milestones: list[int] = _field([80, 120], "epochs where a step schedule multiplies lr by lr_decay")
    lr_decay: float = _field(0.1, "factor of the step schedule", gt=0, le=1)
    warmup_epochs: float = _field(0.0, "linear warm-up from 0 to lr over this many epochs", ge=0)

    @model_validator(mode="after")
    def _milestones_sorted(self) -> "OptimConfig":
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ValueError("milestones must be positive epochs in increasing order")
        return self


class TrainConfig(_Section):
    max_steps: int | None = _field(None, "stop after this many optimizer steps (smoke runs); null: all epochs", gt=0)
    device: Literal["auto", "cpu", "cuda"] = _field("auto", "auto: a GPU if one is visible, else the CPU")
    precision: Literal["auto", "fp32", "bf16"] = _field("auto", "autocast dtype; auto: bf16 on a GPU, fp32 on the CPU")
    channels_last: bool | Literal["auto"] = _field(
        "auto", "NHWC memory format; auto: the faster layout measured for the device (docs/benchmarks.md)")
    compile: bool = _field(False, "wrap the model in torch.compile")
    deterministic: bool = _field(False, "deterministic kernels (bit-identical resume on a GPU; slower)")
    log_every: int = _field(50, "steps between metric lines (and at least one line every 30 s)", gt=0)
    eval_every: int = _field(1, "epochs between evaluations (the last epoch is always evaluated)", gt=0)
    checkpoint_every: int = _field(1000, "steps between checkpoints", gt=0)
    keep_checkpoints: int = _field(2, "complete checkpoints kept (older ones are deleted after a newer one commits)",
                                   gt=0)
    gamma_threshold: float = _field(0.01, "|gamma| below this counts as a switched-off channel in the statistics",
                                    gt=0)
    progress: Literal["auto", "bar", "lines"] = _field("auto", "console output: a progress bar or log lines; "
                                                       "auto: a bar on a terminal")
    stop_check_every: int = _field(10, "steps between the ranks' agreement on a stop signal (a host-side "
                                   "all-reduce); all ranks still stop after the same step", gt=0)
    lean_autograd: bool | Literal["auto"] = _field(
        "auto", "frozen convolutions keep only their weight for backward, BN(+ReLU) its input and a 1-bit ReLU "
        "mask (models/layers.py); auto: on where the mode freezes the convolutions and plain autograd would keep more "
        "than half the rank's memory (plain is faster where it fits; plan.py)")
    activation_checkpointing: list[int] = _field(
        [], "residual stages (1 = layer1) recomputed in backward instead of keeping their activations; same bits, "
        "about one extra forward")
    bn_batch: int | None = _field(
        None, "images every BatchNorm statistic is computed over, whatever the number of ranks: a divisor of the "
        "per-rank batch (groups inside a rank) or a multiple of it (statistics synchronised over consecutive ranks); "
        "null: each rank's own batch, which changes with the world size (models/bn_groups.py)", gt=0)
    frozen_dtype: Literal["auto", "fp32", "bf16"] = _field(
        "auto", "storage dtype of frozen conv/linear weights; bf16 halves their memory and FSDP all-gather bytes, "
        "spares autocast a cast of every frozen weight at every forward, and needs bf16 autocast; auto: bf16 "
        "wherever bf16 autocast is on (the frozen-weight digest is always taken in fp32)")

    @field_validator("activation_checkpointing")
    @classmethod
    def _stages_valid(cls, stages: list[int]) -> list[int]:
        if any(s < 1 or s > 4 for s in stages) or len(set(stages)) != len(stages):
            raise ValueError("must list distinct residual stages between 1 and 4, e.g. [1, 2]")
        return sorted(stages)


class DistConfig(_Section):
    engine: Literal[tuple(ENGINES)] = _field(  # type: ignore[valid-type]
        "ddp", "; ".join(f"{name}: {engine.help}" for name, engine in ENGINES.items()))
    fsdp_unit: Literal["block", "stage"] = _field("block", "FSDP shard group: a residual block or a whole stage")
    zero_stage: Literal[1, 2, 3] = _field(1, "DeepSpeed ZeRO stage (1: optimizer state, 2: + gradients, "
                                          "3: + parameters)")
    timeout_s: int = _field(600, "a collective waiting longer fails the run (a dead or hung rank)", gt=0)
    save_frozen: bool = _field(False, "also store frozen weights in checkpoints (else regenerated from the seed "
                               "and verified by their sha256)")


class Config(_Section):
    mode: Literal[tuple(MODES)] = _field(  # type: ignore[valid-type]
        "bn", "which parameters learn: " + ", ".join(MODES) + " (catalog.py)")
    seed: int = _field(0, "seed of the frozen weights, BN init, data order and augmentation", ge=0)
    runs_root: str = _field("runs", "folder of run directories")
    name: str | None = _field(None, "run directory name; null derives one from the hyperparameters")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    dist: DistConfig = DistConfig()

    @model_validator(mode="after")
    def _settings_fit_together(self) -> "Config":
        """Every rule across keys that holds on any device (plan.resolve checks the device-dependent rest)."""
        stages = parse_arch(self.model.arch).stages
        if any(s > stages for s in self.train.activation_checkpointing):
            raise ValueError(f"train.activation_checkpointing lists a stage {self.model.arch} does not have; "
                             f"its residual stages are 1 to {stages}")
        if self.train.frozen_dtype == "bf16" and self.train.precision == "fp32":
            raise ValueError("train.frozen_dtype=bf16 needs bf16 autocast; set train.precision=bf16 (or auto on a GPU)")
        engine = ENGINES[self.dist.engine]
        if engine.masked_gradients and masks_gradients(self.mode):
            raise ValueError(f"mode={self.mode} masks gradients inside tensors, which {engine.masked_gradients}; "
                             f"use dist.engine={' or '.join(engines_with('masked_gradients'))}")
        if engine.trains_nothing and trains_nothing(self.mode):
            raise ValueError(f"mode={self.mode} trains nothing, so {engine.trains_nothing}; use dist.engine=ddp")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every key, including those that do not apply to the data set (what identity() hashes)."""
        return self.model_dump(mode="json")

    def to_saved_dict(self) -> dict[str, Any]:
        """The keys that apply to this run: what config.yaml holds (no ImageNet keys for CIFAR)."""
        out = self.to_dict()
        fields = DataConfig.model_fields
        out["data"] = {k: v for k, v in out["data"].items()
                       if self.data.name in ((fields[k].json_schema_extra or {}).get("only_for") or [self.data.name])}
        return out

    def identity(self) -> dict[str, Any]:
        """The flattened keys that determine what the run computes (those that apply to its data set:
        what config.yaml holds, so a run dir's saved config and its checkpoints compare equal)."""
        return self._flat(self.to_saved_dict())

    def _flat(self, tree: dict) -> dict[str, Any]:
        flat = {}
        for section, value in tree.items():
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
        # Every key, as names have always been derived (keys of other data sets at their defaults).
        digest = hashlib.sha256(json.dumps(self._flat(self.to_dict()), sort_keys=True).encode()).hexdigest()
        return f"{self.data.name}_{self.model.arch}_{self.mode}_seed{self.seed}_{digest[:8]}"
