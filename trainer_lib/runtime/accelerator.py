"""The accelerate `Accelerator` of a run, whatever launched it.

The same script runs unchanged under `python`, `accelerate launch` (any
`configs/accelerate/*.yaml`) and the `deepspeed` launcher; DeepSpeed comes from
`train.deepspeed_config` or the accelerate config file (`runtime/deepspeed.py`), FSDP2 from
`train.fsdp` or the accelerate config file (`runtime/fsdp.py`). A launcher setting the trainer
does not honour is refused by name (`check_launcher`), never dropped in silence.
"""

from __future__ import annotations

import atexit
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration

from trainer_lib.errors import ConfigError
from trainer_lib.runtime.deepspeed import build_deepspeed_plugin
from trainer_lib.runtime.fsdp import build_fsdp_plugin, use_fsdp_without_gpu
from trainer_lib.runtime.processes import launched_world_size

# The environment flags build_accelerator set itself (ACCELERATE_USE_DEEPSPEED for
# train.deepspeed_config, ACCELERATE_USE_FSDP for train.fsdp), so that a later run in the same
# process without them does not inherit DeepSpeed or FSDP.
_flags_set_here: set[str] = set()
# Whether the process-wide accelerate state was made FSDP by hand (no GPU): a later run rebuilds it
_state_forced = False


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


def check_launcher(t) -> None:
    """Refuses what a launcher asks for that the trainer does not do, naming it: Megatron-LM,
    accelerate's parallelism config (tensor/context parallel), XLA/TPU, and a mixed precision
    that contradicts train.mixed_precision (the trainer's setting decides)."""
    env = os.environ
    if env.get("ACCELERATE_USE_MEGATRON_LM", "false").lower() == "true":
        raise ConfigError("the accelerate config asks for Megatron-LM, which trainer_lib does not "
                          "run: use FSDP2 (configs/accelerate/fsdp2.yaml) or DeepSpeed "
                          "(configs/accelerate/zero3.yaml) to shard a large model")
    if env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        sizes = {k[len("PARALLELISM_CONFIG_"):].lower(): v for k, v in env.items()
                 if k.startswith("PARALLELISM_CONFIG_")}
        raise ConfigError(f"the accelerate config sets a parallelism config ({sizes or 'given'}: "
                          "tensor, context or sequence parallelism), which trainer_lib does not "
                          "run: remove it and shard with FSDP2 or DeepSpeed ZeRO-3")
    from accelerate.utils import is_torch_xla_available

    if is_torch_xla_available():
        raise ConfigError("torch_xla is installed, so accelerate would train on XLA (TPU), which "
                          "trainer_lib does not support: run on GPU or CPU, in an environment "
                          "without torch_xla")
    launched = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched != "no" and launched != t.mixed_precision:
        raise ConfigError(f"the launcher asks for mixed precision '{launched}' (accelerate's "
                          f"mixed_precision / --mixed_precision) but train.mixed_precision is "
                          f"'{t.mixed_precision}'; the trainer's setting decides: set "
                          f"train.mixed_precision={launched}, or launch with mixed_precision "
                          "'no'")


def become_single_process_group() -> list[str]:
    """For DeepSpeed in one process that no launcher started: the variables a launcher sets
    (rank 0 of 1, an address and a free local port) where they are missing, since DeepSpeed
    would otherwise look for MPI (mpi4py). Returns the names it set."""
    if launched_world_size() > 1 or any(n in os.environ for n in _MPI_VARIABLES):
        return []
    wanted = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            wanted["MASTER_PORT"] = str(s.getsockname()[1])
    set_here = [name for name in wanted if name not in os.environ]
    os.environ.update({name: wanted[name] for name in set_here})
    return set_here


_MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _forget_earlier_run() -> None:
    """accelerate keeps its settings in process-wide singletons; a second run in the same process
    (a notebook, a test) may use other settings, so they start afresh. The process group
    (PartialState) is kept unless an earlier run shaped it for DeepSpeed or FSDP."""
    global _state_forced
    rebuild = _state_forced
    for flag in _flags_set_here:  # set by an earlier run in this process, not by a launcher
        os.environ.pop(flag, None)
        rebuild = rebuild or flag == "ACCELERATE_USE_DEEPSPEED"  # built for DeepSpeed
    _flags_set_here.clear()
    _state_forced = False
    AcceleratorState._reset_state(reset_partial_state=rebuild)
    GradientState._reset_state()


def build_accelerator(config, log_with=None, project_dir=None) -> Accelerator:
    """`log_with` and `project_dir`: the trackers (`training/tracking.py`)."""
    global _state_forced
    t = config.train
    _register_exit_hook()
    _forget_earlier_run()
    check_launcher(t)
    plugin = build_deepspeed_plugin(t)
    fsdp = build_fsdp_plugin(t)
    if plugin is not None and fsdp is not None:
        raise ConfigError("both DeepSpeed and FSDP are asked for (train.deepspeed_config or a "
                          "DeepSpeed accelerate config, and train.fsdp or an FSDP accelerate "
                          "config): choose one")
    if fsdp is not None and "LOCAL_RANK" not in os.environ:
        raise ConfigError("FSDP shards the model across the processes a launcher starts: run "
                          "the script with torchrun or accelerate launch (e.g. accelerate launch "
                          "--config_file configs/accelerate/fsdp2.yaml script.py), or unset "
                          "train.fsdp")
    if plugin is not None and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        # the process group below must be created the DeepSpeed way (deepspeed.init_distributed)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        _flags_set_here.add("ACCELERATE_USE_DEEPSPEED")
    if fsdp is not None and os.environ.get("ACCELERATE_USE_FSDP") != "true":
        _flags_set_here.add("ACCELERATE_USE_FSDP")  # the Accelerator sets it for the plugin
    set_here = become_single_process_group() if plugin is not None else []
    no_gpu = not torch.cuda.is_available()
    several_cpu_processes = launched_world_size() > 1 and no_gpu
    if no_gpu and (fsdp is not None or plugin is not None):
        # Without a GPU, accelerate does not create a process group by itself under DeepSpeed or
        # FSDP (every rank then thinks it is alone and trains on all the data): create it on gloo.
        PartialState(backend="gloo")
    accelerator = Accelerator(
        # trackers named by train.tracker (a missing package fails here, before any loading)
        log_with=log_with, project_dir=project_dir,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        deepspeed_plugin=plugin,
        fsdp_plugin=fsdp,
        # several processes without a GPU and without DeepSpeed or FSDP: DDP over gloo (a
        # launcher configured for GPUs would otherwise leave each process training alone)
        cpu=several_cpu_processes and plugin is None and fsdp is None,
        dataloader_config=DataLoaderConfiguration(
            # a seedable sampler makes the data order a function of (seed, epoch), which is what
            # lets a resumed run see the same batches as an uninterrupted one
            use_seedable_sampler=True,
            # even batches would repeat samples from the start of the epoch on the ranks that
            # come up short; the loop instead lets such a rank join the step with an empty share
            even_batches=False,
        ),
    )
    if fsdp is not None and no_gpu:
        use_fsdp_without_gpu(accelerator, fsdp, t.mixed_precision)
        _state_forced = True
    if torch.distributed.is_initialized():
        # the group exists: a process this one starts must not find its address and port (it
        # would try to open the same port); DeepSpeed still reads the rank variables
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name in set_here:
                os.environ.pop(name)
    return accelerator
