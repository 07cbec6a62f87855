"""What a run computes, resolved once: the configuration and everything derived from it.

In: a YAML file from configs/ and key=value overrides. Out: a frozen, validated Config
(schema; read by loading), the Plan that resolves every `auto` setting for one device and
world (plan), the architectures and modes as plain data (catalog), and the generated key
reference (reference: docs/config.md). Nothing here touches a run directory, data or a device.
"""
from bnonly_dist.config.loading import (  # noqa: F401  (the front door: callers import from bnonly_dist.config)
    apply_overrides, from_dict, leaves, load, load_with_sources, parse_args, parse_override, read_mapping,
    read_run_config, save)
from bnonly_dist.config.schema import (  # noqa: F401
    NON_IDENTITY_KEYS, Config, ConfigError, DataConfig, DistConfig, ModelConfig, OptimConfig, TrainConfig)
