"""Dropout off for a run (KTO's default), with the configured values kept for saving."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model) -> None:
    """Sets every dropout probability of the model to 0, wherever it lives: nn.Dropout modules
    (LoRA's included), float attributes that modules copied from the config at init (Llama's
    `self.attention_dropout`), and the config itself (Falcon and GPT-Neo read it in forward).

    The user's config values are kept aside and written back for saving (`dropout_as_configured`):
    the saved folder is the model as it was configured, only this run trains without dropout.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if _is_dropout_name(name) and type(value) is float:
                setattr(module, name, 0.0)
    kept = model.__dict__.setdefault("_dropout_as_configured", [])  # not in the saved config
    for config in _configs(model):
        for name, value in list(vars(config).items()):
            if _is_dropout_name(name) and type(value) is float and value != 0.0:
                kept.append((config, name, value))
                setattr(config, name, 0.0)


@contextmanager
def dropout_as_configured(model):
    """Within it, the model's config carries the dropout the user configured (for saving)."""
    changed = []
    for module in model.modules():
        for config, name, value in module.__dict__.get("_dropout_as_configured", []):
            changed.append((config, name, getattr(config, name)))
            setattr(config, name, value)
    try:
        yield
    finally:
        for config, name, value in reversed(changed):
            setattr(config, name, value)


def _configs(model) -> list:
    """The model's config and its sub-configs (a multimodal model's text config, ...)."""
    from transformers import PretrainedConfig

    seen, found = set(), []
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if not isinstance(config, PretrainedConfig) or id(config) in seen:
            continue
        seen.add(id(config))
        found.append(config)
        stack.extend(v for v in vars(config).values() if isinstance(v, PretrainedConfig))
    return found
