"""The run's configuration: sections, `Config`, and the default config of each method."""

from trainer_lib.config.config import (
    Config,
    default_config,
    default_kto_config,
    default_sft_config,
    parse_override,
)
from trainer_lib.config.sections import (
    DataConfig,
    EarlyStoppingConfig,
    MethodConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainConfig,
)
from trainer_lib.errors import ConfigError

__all__ = ["Config", "ConfigError", "DataConfig", "EarlyStoppingConfig", "MethodConfig", "ModelConfig",
           "OptimizerConfig", "SchedulerConfig", "TokenizerConfig", "TrainConfig",
           "default_config", "default_kto_config", "default_sft_config", "parse_override"]
