"""DeepSpeed: its config completed from the trainer's settings, the ZeRO stage in use, and its
checkpoint writes made safe to fail on one process.

The DeepSpeed config's "auto" values are filled from the trainer's own settings and values that
contradict them are refused, before anything is trained.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, get_args

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin

from trainer_lib.errors import ConfigError, did_you_mean
from trainer_lib.runtime.fsdp import is_fsdp, shard_frozen_model
from trainer_lib.runtime.processes import launched_world_size


def build_deepspeed_plugin(t) -> DeepSpeedPlugin | None:
    """A DeepSpeed plugin whose config agrees with the trainer's, or None when DeepSpeed is not
    asked for (neither `train.deepspeed_config` nor an accelerate config with DeepSpeed)."""
    if t.deepspeed_config is not None:
        ds = resolve_deepspeed_config(load_deepspeed_config(t.deepspeed_config), t,
                                      launched_world_size())
        return DeepSpeedPlugin(hf_ds_config=ds)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        plugin = DeepSpeedPlugin()  # from the accelerate config file (environment variables)
        resolve_deepspeed_config(plugin.deepspeed_config, t, launched_world_size(), inplace=True)
        plugin.zero3_save_16bit_model = plugin.deepspeed_config["zero_optimization"].get(
            "stage3_gather_16bit_weights_on_model_save", False)
        return plugin
    return None


def load_deepspeed_config(spec: str | os.PathLike | dict) -> dict:
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: no DeepSpeed config file at '{path}'")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: '{path}' is not valid JSON: {e}") from None


def resolve_deepspeed_config(ds: dict, t, world_size: int,
                             inplace: bool = False) -> dict:
    """Fills the "auto" values of a DeepSpeed config from the trainer's settings and refuses
    values that contradict them.

    - train_micro_batch_size_per_gpu = train.batch_size
    - gradient_accumulation_steps = train.gradient_accumulation_steps
    - train_batch_size = batch_size * gradient_accumulation_steps * number of processes
    - gradient_clipping = train.max_grad_norm (0 when clipping is off)
    - bf16/fp16 enabled from train.mixed_precision
    - ZeRO-3: stage3_gather_16bit_weights_on_model_save = true, so the model can be saved whole.
    """
    ds = ds if inplace else copy.deepcopy(ds)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"the DeepSpeed config has an '{section}' section; trainer_lib builds the "
                f"optimiser and schedule from config.optimizer and config.scheduler (with CPU "
                f"offload, DeepSpeed's CPU Adam is used in its place): remove '{section}'"
            )
    global_batch = t.batch_size * t.gradient_accumulation_steps * world_size
    wanted = {
        "train_micro_batch_size_per_gpu": (t.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps,
                                        "train.gradient_accumulation_steps"),
        "train_batch_size": (global_batch, f"train.batch_size * train.gradient_accumulation_steps"
                                           f" * {world_size} processes"),
    }
    for key, (value, source) in wanted.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif given != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={given!r} but the trainer uses {value} "
                f"({source}); set it to \"auto\" (or to {value}) in the DeepSpeed config, or "
                f"change the train settings to match"
            )
    clip = t.max_grad_norm or 0.0
    given = ds.get("gradient_clipping", "auto")
    if given == "auto":
        ds["gradient_clipping"] = clip
    elif float(given) != float(clip):
        raise ConfigError(f"the DeepSpeed config sets gradient_clipping={given!r} but "
                          f"train.max_grad_norm is {t.max_grad_norm}; use \"auto\"")
    for kind in ("bf16", "fp16"):
        section = ds.setdefault(kind, {"enabled": "auto"})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = t.mixed_precision == kind
        elif section["enabled"] and t.mixed_precision != kind:
            raise ConfigError(f"the DeepSpeed config enables {kind} but train.mixed_precision is "
                              f"'{t.mixed_precision}'; use \"enabled\": \"auto\"")
    check_deepspeed_config(ds)
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    if zero.get("stage", 0) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


# ---------------------------------------------------------------------- DeepSpeed's own checks

# top-level keys DeepSpeed reads outside its DeepSpeedConfig (the engine, the launcher)
_READ_ELSEWHERE = {"optimizer", "scheduler", "aio", "autotuning", "flops_profiler",
                   "activation_checkpointing", "sequence_parallel_size"}


class _NotingKeys(dict):
    """A config dict that notes which of its top-level keys are looked up."""

    def __init__(self, data: dict, looked_up: set):
        super().__init__(data)
        self.looked_up = looked_up

    def __copy__(self):
        return _NotingKeys(self, self.looked_up)

    def __contains__(self, key):
        self.looked_up.add(key)
        return super().__contains__(key)

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.looked_up.add(key)
        return super().get(key, default)

    def keys(self):
        return _NotedKeys(self)


class _NotedKeys(list):
    def __init__(self, owner: _NotingKeys):
        super().__init__(dict.keys(owner))
        self.owner = owner

    def __contains__(self, key):
        self.owner.looked_up.add(key)
        return list.__contains__(self, key)


def _without_auto(value):
    """The config with its "auto" values (filled by accelerate once the model is prepared) and
    the global batch (the process count is not known yet) left out."""
    if isinstance(value, dict):
        return {k: _without_auto(v) for k, v in value.items()
                if v != "auto" and k != "train_batch_size"}
    return value


def check_deepspeed_config(ds: dict) -> None:
    """The DeepSpeed config through DeepSpeed's own parser, before anything is loaded: a key it
    does not know at the top level (which it would ignore in silence: `zero_optimisation` would
    train under the default stage) and its sections' checks (a misspelt key inside
    `zero_optimization`, a wrong value), each said in one line with the closest valid key."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    looked_up: set = set()
    deepspeed_logger = logging.getLogger("DeepSpeed")
    level = deepspeed_logger.level
    deepspeed_logger.setLevel(logging.WARNING)  # its INFO lines about a config built to check
    try:
        DeepSpeedConfig(_NotingKeys(_without_auto(ds), looked_up))
    except pydantic.ValidationError as e:
        raise ConfigError(_validation_message(e)) from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"the DeepSpeed config is refused by DeepSpeed: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else repr(e)}"
                          ) from None
    finally:
        deepspeed_logger.setLevel(level)
    known = looked_up | _READ_ELSEWHERE
    for key in ds:
        if key not in known:
            hint = did_you_mean(key, sorted(k for k in known if isinstance(k, str)))
            raise ConfigError(f"the DeepSpeed config has a key DeepSpeed does not know, '{key}', "
                              f"which it would ignore in silence{hint or '; remove it'}")


def _validation_message(error) -> str:
    """pydantic's several lines about a DeepSpeed section as one: the first problem, with the
    closest valid key for an unknown one."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    section = _SECTIONS.get(error.title, error.title)
    if first["type"] == "extra_forbidden":
        valid = _field_names(error.title, [str(p) for p in first["loc"][:-1]])
        hint = did_you_mean(str(first["loc"][-1]), valid)
        return (f"the DeepSpeed config's '{section}' has a key DeepSpeed does not know, "
                f"'{where}'{hint or '; remove it'}")
    return (f"the DeepSpeed config's '{section}.{where}' is refused by DeepSpeed: {first['msg']} "
            f"(got {first.get('input')!r})")


# DeepSpeed's section models by the key they read
_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
             "DeepSpeedFP16Config": "fp16"}


def _field_names(model_name: str, path: list[str]) -> list[str]:
    """The field names (and aliases) of a DeepSpeed config model, or of the model nested in it at
    `path`."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    model = next((c for c in subclasses(DeepSpeedConfigModel) if c.__name__ == model_name), None)
    for part in path:
        if model is None:
            return []
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        nested = [a for a in get_args(field.annotation) or (field.annotation,)
                  if isinstance(a, type) and issubclass(a, DeepSpeedConfigModel)] if field else []
        model = nested[0] if nested else None
    if model is None:
        return []
    return sorted({n for n in model.model_fields} | {f.alias for f in model.model_fields.values()
                                                     if f.alias})


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage in use, 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_zero3(accelerator: Accelerator) -> bool:
    """True when parameters are sharded across processes (DeepSpeed ZeRO-3): every process must
    then take part in every forward pass, generation included."""
    return zero_stage(accelerator) == 3


@contextmanager
def save_failures_deferred(accelerator: Accelerator, engine) -> Iterator[None]:
    """While the block runs, a DeepSpeed engine's `save_checkpoint` whose writes fail on this
    process still takes part in every collective of the save before raising, so the processes
    whose writes went well do not wait for this one forever. Its collectives surround the
    writes: a barrier and the tag check before, ZeRO-3's gathering of persistent parameters and a
    last barrier after. So a failed shard write (or copy of the recovery script) is recorded and
    raised once `save_checkpoint` is done; a failure it raises itself (the `latest` file, written
    after everything but the last barrier) joins that barrier first. The folder exists before
    (it is made with the checkpoint's), so nothing can fail before the first collectives.
    Without DeepSpeed, or in one process, nothing changes."""
    if accelerator.num_processes == 1 or not hasattr(engine, "checkpoint_engine"):
        yield
        return
    failures: list[Exception] = []

    def deferred(write):
        def run(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - raised after the save's collectives
                failures.append(e)
        return run

    save = engine.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        try:
            done = save(*args, **kwargs)
        except Exception:
            torch.distributed.barrier()  # the one that ends save_checkpoint on the others
            raise
        if failures:
            raise failures[0]
        return done

    writer = engine.checkpoint_engine
    replaced = [(writer, "save", deferred(writer.save)),
                (engine, "save_checkpoint", save_checkpoint)]
    if hasattr(engine, "_copy_recovery_script"):
        replaced.append((engine, "_copy_recovery_script", deferred(engine._copy_recovery_script)))
    for owner, name, function in replaced:
        setattr(owner, name, function)
    try:
        yield
    finally:
        for owner, name, _ in replaced:
            delattr(owner, name)  # the class's method again


def prepare_reference_model(accelerator: Accelerator, model: torch.nn.Module):
    """A frozen copy of the policy for methods that compare against a reference (KTO).

    Under DeepSpeed ZeRO-3 it becomes a DeepSpeed inference engine sharded like the policy (no
    optimiser, so it costs 1/N of its weights per process), under FSDP2 an FSDP2 module sharded
    like the policy (a whole copy per process would undo what FSDP was chosen for); under ZeRO-1/2
    and without either it is put whole on the device, in the precision the policy computes in (DeepSpeed's half
    precision weights, or accelerate's autocast around forward). Either way it is in eval mode
    with requires_grad False.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if is_fsdp(accelerator):  # computes in the policy's precision (the same FSDP2 settings)
        return shard_frozen_model(accelerator, model)
    if not is_zero3(accelerator):
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        for kind, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            # DeepSpeed casts the policy's weights to its half precision: the reference too
            if plugin is not None and plugin.deepspeed_config.get(kind, {}).get("enabled") is True:
                model.to(dtype)
        if accelerator.native_amp and plugin is None:
            # the autocast wrapper accelerate.prepare puts on the policy's forward, so that both
            # compute in the same precision
            from types import MethodType

            from accelerate.utils import convert_outputs_to_fp32
            from accelerate.utils.modeling import get_mixed_precision_context_manager

            autocast = get_mixed_precision_context_manager(accelerator.native_amp,
                                                           accelerator.autocast_handler)
            forward = autocast(model.forward.__func__)
            model.forward = MethodType(convert_outputs_to_fp32(forward), model)
        return model.to(accelerator.device)
    import deepspeed

    ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    zero = ds["zero_optimization"]
    zero.pop("offload_optimizer", None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    autos = {"reduce_bucket_size": hidden * hidden if hidden else None,
             "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden) if hidden else None,
             "stage3_param_persistence_threshold": 10 * hidden if hidden else None}
    for key, value in autos.items():
        if zero.get(key) == "auto":
            if value is None:
                zero.pop(key)
            else:
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine

