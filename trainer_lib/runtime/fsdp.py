"""FSDP2 (torch's `fully_shard`): the plugin from `train.fsdp` or an accelerate FSDP config.

Only FSDP version 2 is supported. A setting it cannot apply (FSDP1's own settings, an unknown
name) is refused by name before anything loads, never dropped in silence. The loss reads the
output head's weight after the model's forward, where FSDP2 holds it whole (accelerate keeps the
final norm and head gathered from the forward to the backward), so the head must be a plain
`nn.Linear` (`check_sharded_model`).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from trainer_lib.errors import ConfigError, did_you_mean

# FullyShardedDataParallelPlugin's settings that FSDP2 applies
FSDP2_OPTIONS = (
    "fsdp_version", "reshard_after_forward", "auto_wrap_policy", "transformer_cls_names_to_wrap",
    "min_num_params", "cpu_offload", "state_dict_type", "mixed_precision_policy",
    "activation_checkpointing", "activation_checkpointing_offload", "cpu_ram_efficient_loading",
    "ignored_modules",
)
# FSDP1's settings, which FSDP2 does not have: what to use instead
FSDP1_OPTIONS = {
    "sharding_strategy": "reshard_after_forward (true: FULL_SHARD, false: SHARD_GRAD_OP)",
    "backward_prefetch": "nothing (FSDP2 prefetches by itself)",
    "forward_prefetch": "nothing (FSDP2 prefetches by itself)",
    "use_orig_params": "nothing (FSDP2 always trains the original parameters)",
    "sync_module_states": "cpu_ram_efficient_loading",
    "limit_all_gathers": "nothing",
    "param_init_fn": "nothing",
    "state_dict_config": "state_dict_type",
    "optim_state_dict_config": "state_dict_type",
}
# what an accelerate config's FSDP1-only keys become in the environment, and their defaults
_FSDP1_ENV = {"FSDP_SHARDING_STRATEGY": ("sharding_strategy", ("FULL_SHARD", "1")),
              "FSDP_BACKWARD_PREFETCH": ("backward_prefetch", ("NO_PREFETCH",)),
              "FSDP_FORWARD_PREFETCH": ("forward_prefetch", ("false",))}


def launched_with_fsdp() -> bool:
    """An accelerate FSDP config (`distributed_type: FSDP`) launched this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def build_fsdp_plugin(t) -> FullyShardedDataParallelPlugin | None:
    """The FSDP2 plugin asked for by `train.fsdp` (True, or a dict of the plugin's settings,
    with or without their accelerate-config prefix `fsdp_`) and/or an accelerate FSDP config
    (its settings arrive as FSDP_* environment variables; train.fsdp's take precedence);
    None when neither asks for FSDP."""
    launched = launched_with_fsdp()
    if not t.fsdp and not launched:
        return None
    options = _options(t.fsdp)
    if "fsdp_version" in options:
        version, where = options["fsdp_version"], "train.fsdp"
    elif launched:
        version, where = os.environ.get("FSDP_VERSION", "1"), "the accelerate config"
    else:
        version, where = 2, None
    if str(version) != "2":
        raise ConfigError(
            f"{where} asks for FSDP version {version}; trainer_lib shards with FSDP2 only (torch's "
            "fully_shard): set fsdp_version: 2 (see configs/accelerate/fsdp2.yaml)")
    if launched:
        for env, (name, defaults) in _FSDP1_ENV.items():
            value = os.environ.get(env)
            if value is not None and value not in defaults and name not in options:
                raise ConfigError(
                    f"the accelerate config sets fsdp_{name}={value}, an FSDP1 setting that "
                    f"FSDP2 does not have; use {FSDP1_OPTIONS[name]} instead, or remove it")
    options["fsdp_version"] = 2
    if not launched:  # train.fsdp alone: each transformer block its own unit, as the config has
        options.setdefault("auto_wrap_policy", "transformer_based_wrap")
    try:
        return FullyShardedDataParallelPlugin(**options)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"FSDP2 settings: {e}") from None


def _options(spec) -> dict:
    if spec is None or isinstance(spec, bool):
        return {}
    options = {}
    for key, value in spec.items():
        name = key if key == "fsdp_version" else key.removeprefix("fsdp_")
        if name in FSDP1_OPTIONS:
            raise ConfigError(f"train.fsdp.{key} is an FSDP1 setting that FSDP2 does not have; "
                              f"use {FSDP1_OPTIONS[name]} instead")
        if name not in FSDP2_OPTIONS:
            raise ConfigError(f"train.fsdp.{key} is not an FSDP2 setting"
                              f"{did_you_mean(name, FSDP2_OPTIONS)} (settings: "
                              f"{', '.join(FSDP2_OPTIONS)})")
        options[name] = value
    return options


def use_fsdp_without_gpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin,
                         mixed_precision: str) -> None:
    """accelerate sets up FSDP only over GPUs (or other accelerators); torch's FSDP2 runs over
    gloo on CPU as well, so there the state is set as accelerate sets it over GPUs."""
    from accelerate import PartialState

    if accelerator.distributed_type == DistributedType.FSDP:
        return
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    # every later AcceleratorState() copies the process-wide state in: it must agree
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_sharded_model(model: torch.nn.Module) -> None:
    """Under FSDP2 the chunked loss multiplies by the head's weight itself (calling the head
    module outside the model's forward would free weights the backward still needs), so the head
    must be a plain linear layer: not a LoRA-wrapped or quantised one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(
            f"under FSDP2 the output head must be a plain linear layer, but it is a "
            f"{type(head).__name__}: leave the head out of LoRA (model.peft_config's "
            f"target_modules / exclude_modules), or use DeepSpeed ZeRO-3 to shard this model")


def shard_frozen_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model (KTO's reference copy) sharded like the policy: FSDP2 with the run's
    settings, no optimiser. Every process must then take part in each of its forward passes."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, model.to(accelerator.device))


def reshard(model: torch.nn.Module) -> None:
    """Frees whatever FSDP2 holds gathered in `model` (each sharded unit, the final norm and head
    included), leaving every parameter as this process's shard; nothing for another model."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
