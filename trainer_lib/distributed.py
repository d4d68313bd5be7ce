"""The accelerate `Accelerator` for a run, DeepSpeed settings, and helpers for several processes.

The same script runs unchanged under `python`, `accelerate launch` (any `configs/accelerate/*.yaml`)
and the `deepspeed` launcher. DeepSpeed is used when either `train.deepspeed_config` is set or the
accelerate config file asks for it; in both cases the DeepSpeed config is completed from the
trainer's own settings (its "auto" values) and checked against them before anything is trained.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DeepSpeedPlugin

from trainer_lib.config import Config, ConfigError, TrainConfig
from trainer_lib.tracking import log_with, run_dir


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun, accelerate launch and deepspeed all set
    WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# Whether ACCELERATE_USE_DEEPSPEED was set by build_accelerator for train.deepspeed_config, so
# that a later run in the same process without it does not inherit DeepSpeed.
_deepspeed_flag_set_here = False


_exit_hook_registered = False


def _destroy_process_group() -> None:
    """Tears the process group down while the interpreter is still whole. Left to interpreter
    shutdown, gloo's worker threads can outlive the objects they hold and the process aborts
    ("terminate called without an active exception", exit -6) after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already half torn down: nothing is left to protect
            pass


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_destroy_process_group)
        _exit_hook_registered = True


def build_accelerator(config: Config) -> Accelerator:
    t = config.train
    _register_exit_hook()
    # accelerate keeps its settings in process-wide singletons; a second run in the same process
    # (a notebook, a test) may use other settings, so they start afresh. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    global _deepspeed_flag_set_here
    if _deepspeed_flag_set_here:  # by an earlier run in this process, not by a launcher
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        _deepspeed_flag_set_here = False
        AcceleratorState._reset_state(reset_partial_state=True)  # it was built for DeepSpeed
    plugin = build_deepspeed_plugin(t)
    if plugin is not None and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        # the process group below must be created the DeepSpeed way (deepspeed.init_distributed)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        _deepspeed_flag_set_here = True
    several_cpu_processes = launched_world_size() > 1 and not torch.cuda.is_available()
    if several_cpu_processes and plugin is not None:
        # Without a GPU, accelerate does not create a process group by itself under DeepSpeed
        # (every rank then thinks it is alone and trains on all the data): create it on gloo.
        PartialState(backend="gloo")
    return Accelerator(
        # trackers named by train.tracker (a missing package fails here, before any loading)
        log_with=log_with(config), project_dir=str(run_dir(config)),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        deepspeed_plugin=plugin,
        # several processes without a GPU and without DeepSpeed: DDP over gloo (a launcher
        # configured for GPUs would otherwise leave each process training alone)
        cpu=several_cpu_processes and plugin is None,
        dataloader_config=DataLoaderConfiguration(
            # a seedable sampler makes the data order a function of (seed, epoch), which is what
            # lets a resumed run see the same batches as an uninterrupted one
            use_seedable_sampler=True,
            # even batches would repeat samples from the start of the epoch on the ranks that
            # come up short; the loop instead lets such a rank join the step with an empty share
            even_batches=False,
        ),
    )


# --------------------------------------------------------------------------- DeepSpeed


def build_deepspeed_plugin(t: TrainConfig) -> DeepSpeedPlugin | None:
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
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: '{path}' is not valid JSON: {e}") from None


def resolve_deepspeed_config(ds: dict, t: TrainConfig, world_size: int,
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
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    if zero.get("stage", 0) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


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


def prepare_reference_model(accelerator: Accelerator, model: torch.nn.Module):
    """A frozen copy of the policy for methods that compare against a reference (KTO).

    Under DeepSpeed ZeRO-3 it becomes a DeepSpeed inference engine sharded like the policy (no
    optimiser, so it costs 1/N of its weights per process); under ZeRO-1/2 and without DeepSpeed
    it is put whole on the device, in the precision the policy computes in (DeepSpeed's half
    precision weights, or accelerate's autocast around forward). Either way it is in eval mode
    with requires_grad False.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
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


# --------------------------------------------------------------------------- the loop's helpers


def batches_per_process(accelerator: Accelerator, num_batches: int) -> int:
    """Micro-batches the busiest process gets per epoch: accelerate deals whole batches out in
    turn (and, with even_batches=False, repeats none)."""
    return -(-num_batches // accelerator.num_processes)


def align_micro_batches(accelerator: Accelerator, micro: list) -> list:
    """Pads this process's micro-batches of one optimiser step with None up to the most any
    process has, so every process runs the same forward/backward passes (DDP and ZeRO
    collectives would otherwise wait forever). Returns [] once every process is out of data."""
    if accelerator.num_processes == 1:
        return micro
    n = torch.tensor([len(micro)], device=accelerator.device)
    most = int(accelerator.gather(n).max())
    return micro + [None] * (most - len(micro))


def reduce_sum(accelerator: Accelerator, values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sums a small vector of numbers over all processes (one collective call)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t
