"""trainer_lib: supervised fine-tuning and KTO alignment of causal language models."""

from trainer_lib.quiet import install as _install_quiet

_install_quiet()  # first: some of the silenced messages come at import time

from trainer_lib.api import train  # noqa: E402
from trainer_lib.config import (
    Config,
    ConfigError,
    KTOConfig,
    SFTConfig,
    default_kto_config,
    default_sft_config,
)
from trainer_lib.data.samples import DataError
from trainer_lib.registry import register_trainer
from trainer_lib.trainers import KTOTrainer, SFTTrainer, Trainer

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "KTOConfig",
    "KTOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "Trainer",
    "default_kto_config",
    "default_sft_config",
    "register_trainer",
    "train",
]
