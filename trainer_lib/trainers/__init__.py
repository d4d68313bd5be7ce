"""The built-in trainers. Importing this package registers each of them, visibly, here."""

from trainer_lib.trainers.base import Trainer
from trainer_lib.trainers.kto import KTOTrainer
from trainer_lib.trainers.sft import SFTTrainer

__all__ = ["Trainer", "SFTTrainer", "KTOTrainer"]
