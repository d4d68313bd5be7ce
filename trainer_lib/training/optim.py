"""The optimiser and the learning-rate schedule of a run, built from the checked config."""

from __future__ import annotations

import math

import torch

from trainer_lib.config.optimizer import (
    HORIZON_ARGS,
    accepted_arguments,
    check_optimizer,
    check_scheduler,
    constructor_kwargs,
    optimizer_class,
    resolve_scheduler,
)
from trainer_lib.errors import ConfigError


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


def _fused_supported(device_type: str) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return device_type == "cuda"
    return device_type in _get_fused_kernels_supported_devices()


def _device_type() -> str:
    from accelerate import PartialState

    return PartialState().device.type


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    check_optimizer(cfg)
    cls = optimizer_class(cfg.name)
    accepted = accepted_arguments(cls.__init__)
    kwargs = constructor_kwargs(cls, cfg.kwargs)
    if (cls in (torch.optim.Adam, torch.optim.AdamW) and "fused" not in kwargs
            and "foreach" not in kwargs and _fused_supported(_device_type())):
        kwargs["fused"] = True  # one kernel per step; the same update to float tolerance
    weight_decay = kwargs.pop("weight_decay", 0.0)
    if "weight_decay" in accepted:
        groups = param_groups(model, weight_decay)
    else:  # e.g. Rprop: no decay to apply (check_optimizer refused one), one group
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the model has no trainable parameters: check model.num_layers_unfrozen "
                          "and model.peft_config")
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"optimizer {cfg.name!r} with kwargs {cfg.kwargs}: {e}") from None


# --------------------------------------------------------------------------- schedules


def warmup_steps(kwargs: dict, total_steps: int) -> int:
    """`warmup_steps`, or `warmup_ratio` of the run's optimiser steps rounded up (as the HF
    Trainer does)."""
    if kwargs.get("warmup_steps"):
        return int(kwargs["warmup_steps"])
    return math.ceil(float(kwargs.get("warmup_ratio") or 0.0) * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule over the run's `total_steps` optimiser steps, stepped once per step."""
    check_scheduler(cfg)
    source, what = resolve_scheduler(cfg.name, cfg.kwargs)
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("warmup_steps", "warmup_ratio")}
    if source == "torch":
        for name in HORIZON_ARGS:
            if name in accepted_arguments(what.__init__) and name not in kwargs:
                kwargs[name] = total_steps
        if "T_max" in kwargs:
            kwargs["T_max"] = int(kwargs["T_max"])
        return what(optimizer, **kwargs)

    from transformers.optimization import get_scheduler

    warmup = warmup_steps(cfg.kwargs, total_steps)
    min_ratio = kwargs.pop("min_lr_ratio", None) if what in ("linear", "cosine") else None
    if min_ratio:  # a floor under the decay: the transformers schedule that has one
        if what == "cosine":
            what, kwargs = "cosine_with_min_lr", {**kwargs, "min_lr_rate": min_ratio}
        else:  # linear decay to a floor is a polynomial decay of power 1
            lr = optimizer.defaults["lr"]
            what, kwargs = "polynomial", {"lr_end": min_ratio * lr, "power": 1.0}
    return get_scheduler(what, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
