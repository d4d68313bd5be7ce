"""LoRA adapters through peft, from `model.peft_config`: a `peft.LoraConfig`, or a dict of its
arguments, the shorthands rank/alpha/dropout, or NeMo RL's LoRA keys as written there. A target
module that matches nothing is an error rather than a layer silently left without an adapter.
"""

from __future__ import annotations

import fnmatch
import os
import re

import torch

from trainer_lib.errors import ConfigError, closest

_SHORTHANDS = {"rank": "r", "dim": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
# Linear layers of SSM mixers whose weight the model reads directly, past the module (an
# adapter there would never train), or that peft refuses for that reason (the fused kernels'
# out_proj): "all-linear" leaves them out
_READ_PAST_THE_MODULE = {
    "mamba": ("dt_proj", "out_proj"), "falcon_mamba": ("dt_proj", "out_proj"),
    "jamba": ("dt_proj",), "zamba": ("dt_proj",),
    "mamba2": ("out_proj",), "nemotron_h": ("out_proj",), "falcon_h1": ("out_proj",),
}
_A_INITS = {"kaiming": True, "uniform": True, "xavier": "xavier"}  # -> init_lora_weights
_NEMO_KEYS = ("enabled", "dropout_position", "lora_A_init", "lora_A_init_method",
              "lora_B_init_method", "match_all_linear", "use_triton")
_NEMO_UNSUPPORTED = {
    "lora_dtype": "the adapters take the base layer's dtype (model.torch_dtype)",
    "a2a_experimental": "it is a Megatron communication option",
}


def _wildcards_to_regex(names: list[str]) -> str:
    """NeMo-style module patterns ("*.layers.0.*.linear_qkv", "q_proj") as one regular
    expression on full module names, which is how peft reads a string."""
    parts = []
    for name in names:
        if any(c in name for c in "*?["):
            parts.append(fnmatch.translate(name))
        else:  # a plain name matches the module of that name anywhere
            parts.append(r"(?:.*\.)?" + re.escape(name))
    return "|".join(f"(?:{p})" for p in parts)


def _from_nemo(kwargs: dict) -> dict:
    """Maps NeMo RL's LoRA keys onto peft.LoraConfig's, in place; refuses what peft cannot do."""
    for key, why in _NEMO_UNSUPPORTED.items():
        if key in kwargs:
            raise ConfigError(f"model.peft_config.{key} is not supported: {why}; remove it")
    position = kwargs.pop("dropout_position", "pre")
    if position not in ("pre", "post"):
        raise ConfigError(f"model.peft_config.dropout_position must be 'pre' or 'post', got "
                          f"{position!r}")
    if position == "post" and kwargs.get("lora_dropout", 0.0):
        raise ConfigError(
            "model.peft_config.dropout_position='post' (dropout on the adapter's output) cannot be "
            "done with peft, which applies LoRA dropout to the adapter's input; use "
            "dropout_position='pre', or dropout=0")
    init = kwargs.pop("lora_A_init", None)
    init_method = kwargs.pop("lora_A_init_method", None)
    if init is not None and init_method is not None and init != init_method:
        raise ConfigError("model.peft_config gives both lora_A_init and lora_A_init_method; "
                          "keep one")
    init = init if init is not None else init_method
    if init is not None:
        if init not in _A_INITS:
            raise ConfigError(f"model.peft_config.lora_A_init must be one of "
                              f"{', '.join(map(repr, _A_INITS))}, got {init!r}")
        if "init_lora_weights" in kwargs:
            raise ConfigError("model.peft_config gives both lora_A_init and init_lora_weights; "
                              "keep one")
        kwargs["init_lora_weights"] = _A_INITS[init]
    b_init = kwargs.pop("lora_B_init_method", "zero")
    if b_init not in ("zero", "zeros"):
        raise ConfigError(f"model.peft_config.lora_B_init_method must be 'zero' (LoRA starts as "
                          f"the base model), got {b_init!r}")
    kwargs.pop("use_triton", None)
    targets = kwargs.get("target_modules")
    if kwargs.pop("match_all_linear", False):
        if targets:
            raise ConfigError("model.peft_config gives both match_all_linear=true and "
                              f"target_modules={targets}; keep one")
        kwargs["target_modules"] = "all-linear"
    for key in ("target_modules", "exclude_modules"):
        if kwargs.get(key) == []:
            kwargs.pop(key)  # NeMo writes [] for "none given"
    if "target_modules" not in kwargs:
        raise ConfigError("model.peft_config names no modules to adapt: set target_modules "
                          '(e.g. ["q_proj", "v_proj"]) or match_all_linear=true')
    return kwargs


def build_lora_config(spec):
    """A peft.LoraConfig from `model.peft_config`, or None when it says `enabled: false`."""
    from peft import LoraConfig, PeftConfig

    if isinstance(spec, PeftConfig):
        if not isinstance(spec, LoraConfig):
            raise ConfigError(f"model.peft_config: only LoRA is supported, got {type(spec).__name__}")
        return spec
    if not isinstance(spec, dict):
        raise ConfigError("model.peft_config must be a peft.LoraConfig or a dict of its keyword "
                          f"arguments, got {type(spec).__name__}")
    kwargs = dict(spec)
    if not kwargs.pop("enabled", True):
        return None
    peft_type = str(kwargs.pop("peft_type", "LORA")).upper().split(".")[-1]
    if peft_type != "LORA":
        raise ConfigError(f"model.peft_config: only LoRA is supported, got peft_type={peft_type}")
    for short, full in _SHORTHANDS.items():
        if short in kwargs:
            if full in kwargs:
                given = [k for k, v in _SHORTHANDS.items() if v == full and k in spec] + [full]
                both = " and ".join(repr(g) for g in given)
                raise ConfigError(f"model.peft_config gives both {both} (the same setting); "
                                  "keep one")
            kwargs[full] = kwargs.pop(short)
    if kwargs.get("target_modules") in ("all_linear", "all-linear"):
        kwargs["target_modules"] = "all-linear"
    kwargs.setdefault("task_type", "CAUSAL_LM")
    valid = set(LoraConfig.__dataclass_fields__)
    unknown = [k for k in kwargs if k not in valid and k not in _NEMO_KEYS
               and k not in _NEMO_UNSUPPORTED]
    if unknown:
        hints = []
        for k in unknown:
            close = closest(k, list(valid) + list(_SHORTHANDS) + list(_NEMO_KEYS))
            hints.append(f"'{k}'" + (f" (did you mean '{close}'?)" if close else ""))
        raise ConfigError(f"model.peft_config has unknown keys {', '.join(hints)}; it takes "
                          "peft.LoraConfig's arguments, rank/alpha/dropout, and NeMo RL's LoRA "
                          "keys (dim, alpha, dropout, dropout_position, lora_A_init, "
                          "match_all_linear, target_modules, exclude_modules)")
    if any(k in kwargs for k in _NEMO_KEYS + tuple(_NEMO_UNSUPPORTED)) or isinstance(
            kwargs.get("target_modules"), list) and not kwargs["target_modules"]:
        kwargs = _from_nemo(kwargs)
    for key in ("target_modules", "exclude_modules"):
        value = kwargs.get(key)
        if isinstance(value, (list, tuple)) and any(any(c in n for c in "*?[") for n in value):
            kwargs[key] = _wildcards_to_regex(list(value))
    xavier = kwargs.get("init_lora_weights") == "xavier"
    if xavier:
        kwargs["init_lora_weights"] = True  # lora_A is re-drawn after the adapters exist
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.peft_config: {e}") from None
    config.lora_a_xavier = xavier  # not a LoraConfig field: never saved with the adapter
    return config


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
    """Wraps `model` in a peft model with LoRA adapters; only the adapters train. A spec with
    `enabled: false` leaves the model as it is."""
    from peft import get_peft_model

    lora_config = build_lora_config(spec)
    if lora_config is None:
        return model
    check_target_modules(model, lora_config)
    _leave_out_refused(model, lora_config)
    peft_model = get_peft_model(model, lora_config)
    if getattr(lora_config, "lora_a_xavier", False):
        xavier_init_lora_a(peft_model)
    if base_path:
        # so the saved adapter folder finds its base model from anywhere
        local = os.path.isdir(base_path)
        peft_model.peft_config["default"].base_model_name_or_path = (
            os.path.abspath(base_path) if local else base_path)
    return peft_model


def _leave_out_refused(model: torch.nn.Module, lora_config) -> None:
    """target_modules "all-linear" on a model with linear layers an adapter cannot train (see
    _READ_PAST_THE_MODULE): those are excluded, and the run says so."""
    names = _READ_PAST_THE_MODULE.get(getattr(model.config, "model_type", None))
    if lora_config.target_modules != "all-linear" or not names:
        return
    excluded = lora_config.exclude_modules
    if isinstance(excluded, str):  # a regular expression on full names
        lora_config.exclude_modules = "|".join([f"(?:{excluded})"]
                                               + [rf"(?:.*\.{n})" for n in names])
    else:
        lora_config.exclude_modules = sorted(set(excluded or ()) | set(names))
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"LoRA on all linear layers of {type(model).__name__}: its SSM mixers' "
              f"{' and '.join(names)} are left out (the model reads their weights directly, so an "
              "adapter there would not train)", flush=True)


def xavier_init_lora_a(peft_model, adapter: str = "default") -> None:
    """lora_A drawn from a xavier (Glorot) normal distribution, NeMo's "xavier" choice; lora_B
    stays zero, so the adapted model starts as the base model."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                torch.nn.init.xavier_normal_(module.lora_A[adapter].weight)


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")
