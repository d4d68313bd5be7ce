"""trainer_lib: supervised fine-tuning and KTO alignment of causal language models."""

from trainer_lib.runtime.quiet import install as _install_quiet

_install_quiet()  # first: some of the silenced messages come at import time

from trainer_lib.api import train  # noqa: E402
from trainer_lib.config import (  # noqa: E402
    Config,
    default_config,
    default_kto_config,
    default_sft_config,
)
from trainer_lib.data.mixture import Mixture  # noqa: E402
from trainer_lib.errors import (  # noqa: E402
    ChatError,
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    DataError,
    KTODataError,
    NonFiniteLossError,
    UnsafeCheckpointError,
)
from trainer_lib.methods.kto import KTOConfig, KTOTrainer  # noqa: E402
from trainer_lib.methods.sft import SFTConfig, SFTTrainer  # noqa: E402
from trainer_lib.registry import register_trainer  # noqa: E402
from trainer_lib.training.callbacks import Callback, EarlyStopping  # noqa: E402
from trainer_lib.training.trainer import Trainer  # noqa: E402

__all__ = [
    "Callback",
    "ChatError",
    "CheckpointError",
    "CheckpointWriteError",
    "Config",
    "ConfigError",
    "DataError",
    "EarlyStopping",
    "KTOConfig",
    "KTODataError",
    "KTOTrainer",
    "Mixture",
    "NonFiniteLossError",
    "SFTConfig",
    "SFTTrainer",
    "Trainer",
    "UnsafeCheckpointError",
    "default_config",
    "default_kto_config",
    "default_sft_config",
    "register_trainer",
    "train",
]
