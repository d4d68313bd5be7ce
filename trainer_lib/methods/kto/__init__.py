"""KTO: aligning a causal LM from binary feedback, a thumbs up or down on single completions."""

from trainer_lib.methods.kto.config import KTOConfig
from trainer_lib.methods.kto.recipe import KTORecipe
from trainer_lib.methods.kto.trainer import KTOTrainer

__all__ = ["KTOConfig", "KTORecipe", "KTOTrainer"]
