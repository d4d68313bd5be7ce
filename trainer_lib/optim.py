"""Optimiser and learning-rate schedule from the config."""

from __future__ import annotations

import math

import torch

from trainer_lib.config import OptimizerConfig, SchedulerConfig

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (1-D parameters) are not decayed,
    since shrinking a gain or a bias towards zero is not regularisation but a different model."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    kwargs = dict(cfg.kwargs)
    weight_decay = kwargs.pop("weight_decay", 0.0)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: check model.num_layers_unfrozen "
                         "and model.peft_config")
    try:
        return _OPTIMIZERS[cfg.name](groups, **kwargs)
    except TypeError as e:
        raise ValueError(f"optimizer.kwargs do not fit {cfg.name}: {e}") from None


def lr_lambda(name: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
    """The multiplier of the base learning rate at each optimiser step (0-based)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if name == "linear":
            decay = 1.0 - progress
        else:  # cosine
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    kw = cfg.kwargs
    warmup = kw.get("warmup_steps", 0) or int(round(kw.get("warmup_ratio", 0.0) * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.name, total_steps, warmup, kw.get("min_lr_ratio", 0.0))
    )
