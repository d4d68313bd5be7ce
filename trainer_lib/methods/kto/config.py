"""KTO's settings (`config.method` of a KTO run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from trainer_lib.config.sections import MethodConfig
from trainer_lib.errors import ConfigError


@dataclass
class KTOConfig(MethodConfig):
    name: str = "kto"
    input_key: str = "prompt"
    output_key: str = "completion"
    label_key: str = "label"
    beta: float = 0.1
    desirable_weight: Union[float, str] = 1.0  # or "auto"
    undesirable_weight: float = 1.0
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    sft_weight: float = 0.0
    average_log_probs: bool = False
    # "auto": "adapter" for a PEFT policy, "copy" with sync_ref_model, else "precompute".
    ref_model: Literal["auto", "copy", "precompute", "adapter"] = "auto"
    overlong: Literal["truncate", "drop"] = "truncate"
    # every dropout of the policy and the reference set to 0 (the saved config keeps the user's)
    disable_dropout: bool = True
    # examples and KL rows packed as documents of rows of train.seq_length (else padded rows)
    packing: bool = True
    # examples per forward pass of the precomputed reference pass (None: train.batch_size)
    precompute_ref_batch_size: Optional[int] = None
    # TR-DPO: every ref_model_sync_steps steps, ref <- alpha * policy + (1 - alpha) * ref
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    @classmethod
    def defaults(cls) -> dict:
        return {"optimizer": {"kwargs": {"lr": 5e-6, "weight_decay": 0.0}}}

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"method.beta must be positive, got {self.beta}")
        if isinstance(self.desirable_weight, str):
            if self.desirable_weight != "auto":
                raise ConfigError('method.desirable_weight must be a positive number or "auto"')
        elif self.desirable_weight <= 0:
            raise ConfigError("method.desirable_weight must be positive")
        if self.undesirable_weight <= 0:
            raise ConfigError("method.undesirable_weight must be positive")
        if self.sft_weight < 0:
            raise ConfigError("method.sft_weight must be >= 0")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ConfigError("method.precompute_ref_batch_size must be at least 1, or None "
                              "(train.batch_size)")
        if not 0 < self.ref_model_mixup_alpha <= 1:
            raise ConfigError(f"method.ref_model_mixup_alpha must be within (0, 1], got "
                              f"{self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ConfigError("method.ref_model_sync_steps must be at least 1")
        if self.sync_ref_model and self.ref_model in ("precompute", "adapter"):
            raise ConfigError(
                f'method.sync_ref_model moves the reference towards the policy, which needs a '
                f'reference model of its own; method.ref_model="{self.ref_model}" has none: use '
                'ref_model="copy" (or "auto"), or set sync_ref_model=false')
