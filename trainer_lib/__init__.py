"""trainer_lib: supervised fine-tuning and KTO alignment of causal language models."""

from trainer_lib.config import (
    Config,
    ConfigError,
    KTOConfig,
    SFTConfig,
    default_kto_config,
    default_sft_config,
)

__all__ = [
    "Config",
    "ConfigError",
    "KTOConfig",
    "SFTConfig",
    "default_kto_config",
    "default_sft_config",
]
