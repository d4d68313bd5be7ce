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
from trainer_lib.checkpoint import CheckpointWriteError
from trainer_lib.data.conversations import ChatError
from trainer_lib.data.kto_data import KTODataError
from trainer_lib.data.samples import DataError
from trainer_lib.faults import NonFiniteLossError
from trainer_lib.integrity import CheckpointError, UnsafeCheckpointError
from trainer_lib.registry import register_trainer
from trainer_lib.trainers import KTOTrainer, SFTTrainer, Trainer

__all__ = [
    "ChatError",
    "CheckpointError",
    "CheckpointWriteError",
    "Config",
    "ConfigError",
    "DataError",
    "KTOConfig",
    "KTODataError",
    "NonFiniteLossError",
    "KTOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "Trainer",
    "UnsafeCheckpointError",
    "default_kto_config",
    "default_sft_config",
    "register_trainer",
    "train",
]
