"""Supervised fine-tuning: next-token loss on the tokens a sample marks (completions, assistant
turns, or all of a text)."""

from trainer_lib.methods.sft.config import SFTConfig
from trainer_lib.methods.sft.recipe import SFTRecipe
from trainer_lib.methods.sft.trainer import SFTTrainer

__all__ = ["SFTConfig", "SFTRecipe", "SFTTrainer"]
