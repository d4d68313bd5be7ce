"""The accelerate `Accelerator` for a run, and small helpers for several processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from trainer_lib.config import Config


def build_accelerator(config: Config) -> Accelerator:
    t = config.train
    return Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        # a seedable sampler makes the data order a function of (seed, epoch), which is what
        # lets a resumed run see the same batches as an uninterrupted one
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def reduce_sum(accelerator: Accelerator, values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sums a small vector of numbers over all processes (one collective call)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t
