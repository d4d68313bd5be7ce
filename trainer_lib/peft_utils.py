"""LoRA adapters through peft, from `model.peft_config` (a `peft.LoraConfig` or a dict).

The dict takes LoraConfig's own keyword arguments plus the shorthands `rank` (r), `alpha`
(lora_alpha) and `dropout` (lora_dropout); `target_modules` is a list of module names, a regular
expression, or "all-linear" ("all_linear"): every linear layer except the output head.
"""

from __future__ import annotations

import difflib
import os
import re

import torch

from trainer_lib.config import ConfigError

_SHORTHANDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}


def build_lora_config(spec):
    from peft import LoraConfig, PeftConfig

    if isinstance(spec, PeftConfig):
        if not isinstance(spec, LoraConfig):
            raise ConfigError(f"model.peft_config: only LoRA is supported, got {type(spec).__name__}")
        return spec
    if not isinstance(spec, dict):
        raise ConfigError("model.peft_config must be a peft.LoraConfig or a dict of its keyword "
                          f"arguments, got {type(spec).__name__}")
    kwargs = dict(spec)
    peft_type = str(kwargs.pop("peft_type", "LORA")).upper().split(".")[-1]
    if peft_type != "LORA":
        raise ConfigError(f"model.peft_config: only LoRA is supported, got peft_type={peft_type}")
    for short, full in _SHORTHANDS.items():
        if short in kwargs:
            if full in kwargs:
                raise ConfigError(f"model.peft_config gives both '{short}' and '{full}'; keep one")
            kwargs[full] = kwargs.pop(short)
    if kwargs.get("target_modules") in ("all_linear", "all-linear"):
        kwargs["target_modules"] = "all-linear"
    kwargs.setdefault("task_type", "CAUSAL_LM")
    valid = set(LoraConfig.__dataclass_fields__)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(valid) + list(_SHORTHANDS), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"model.peft_config has unknown keys {', '.join(hints)}; it takes "
                          "peft.LoraConfig's arguments and rank/alpha/dropout")
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.peft_config: {e}") from None


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers, output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not head}
    return sorted(names)


def check_target_modules(model: torch.nn.Module, lora_config) -> None:
    """Every requested target module must match at least one module of the model: a typo in one
    of several names would otherwise silently leave those layers without adapters."""
    targets = lora_config.target_modules
    if targets is None or targets == "all-linear":
        return
    module_names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):  # peft treats a string as a regular expression on full names
        missing = [] if any(re.fullmatch(targets, n) for n in module_names) else [targets]
    else:
        missing = [t for t in targets
                   if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        raise ConfigError(
            f"model.peft_config.target_modules {missing} match no module of the model; its "
            f"linear modules are {linear_module_names(model)} (or use \"all-linear\")"
        )


def apply_lora(model: torch.nn.Module, spec, base_path: str | None = None):
    """Wraps `model` in a peft model with LoRA adapters; only the adapters train."""
    from peft import get_peft_model

    lora_config = build_lora_config(spec)
    check_target_modules(model, lora_config)
    peft_model = get_peft_model(model, lora_config)
    if base_path:
        # so the saved adapter folder finds its base model from anywhere
        local = os.path.isdir(base_path)
        peft_model.peft_config["default"].base_model_name_or_path = (
            os.path.abspath(base_path) if local else base_path)
    return peft_model


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")
