"""The one config loader: YAML run configs -> validated, typed dataclasses.

Every section is a dataclass; :func:`load_run_config` rejects unknown keys, wrong types and impossible
values with a :class:`ConfigError` that names the file, the dotted key and what is allowed, before any
data is prepared or any model is built. Command-line overrides use ``key.sub=value`` (the value is
parsed as YAML). ``${data}`` in a string expands to the data folder (see :mod:`workbench.paths`).

The parts: :mod:`~workbench.config.schema` (the run-config dataclasses), :mod:`~workbench.config.build` (the
generic mapping -> dataclass builder and :class:`ConfigError`, also used for study and ablation files) and
:mod:`~workbench.config.loader` (YAML files, ``base:``, overrides, the stored ``config.yaml`` and run identity).
Import from ``workbench.config``; the split is for readers.
"""

from __future__ import annotations

from workbench.config.build import ConfigError, build_dataclass, check_keys
from workbench.config.loader import (
    CONFIG_SCHEMA_VERSION,
    config_differences,
    config_from_dict,
    deep_merge,
    dump_config,
    get_dotted,
    load_run_config,
    parse_overrides,
    read_yaml,
    refuse_other_file_kinds,
    resolve_base,
    set_dotted,
    stored_schema_version,
)
from workbench.config.schema import (
    CALLBACKS,
    AlgorithmsConfig,
    DataConfig,
    DiffusionConfig,
    DownstreamConfig,
    DropoutConfig,
    DualConfig,
    EvalConfig,
    LoggersConfig,
    MLflowLoggerConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    PrefixLMConfig,
    RunConfig,
    SchedulerConfig,
    TensorBoardLoggerConfig,
    TimeSamplerConfig,
    TokenizerConfig,
    TokenMaskingConfig,
    TrainerConfig,
    WandbLoggerConfig,
    WeightDecayConfig,
    check_processes,
)
from workbench.durations import parse_count, parse_duration

__all__ = [
    "CALLBACKS", "CONFIG_SCHEMA_VERSION", "AlgorithmsConfig", "ConfigError", "DataConfig", "DiffusionConfig",
    "DownstreamConfig", "DropoutConfig", "DualConfig", "EvalConfig", "LoggersConfig", "MLflowLoggerConfig",
    "ModelConfig", "ObjectiveConfig", "OptimizerConfig", "PrefixLMConfig", "RunConfig", "SchedulerConfig",
    "TensorBoardLoggerConfig", "TimeSamplerConfig", "TokenMaskingConfig", "TokenizerConfig", "TrainerConfig",
    "WandbLoggerConfig", "WeightDecayConfig", "build_dataclass", "check_keys", "check_processes",
    "config_differences", "config_from_dict", "deep_merge", "dump_config", "get_dotted", "load_run_config",
    "parse_count", "parse_duration", "parse_overrides", "read_yaml", "refuse_other_file_kinds", "resolve_base",
    "set_dotted", "stored_schema_version",
]
