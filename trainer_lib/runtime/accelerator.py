"""The accelerate `Accelerator` of a run, whatever launched it.

The same script runs unchanged under `python`, `accelerate launch` (any
`configs/accelerate/*.yaml`) and the `deepspeed` launcher; DeepSpeed comes from
`train.deepspeed_config` or the accelerate config file (`runtime/deepspeed.py`).
"""

from __future__ import annotations

import atexit
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration

from trainer_lib.runtime.deepspeed import build_deepspeed_plugin
from trainer_lib.runtime.processes import launched_world_size

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


def build_accelerator(config, log_with=None, project_dir=None) -> Accelerator:
    """`log_with` and `project_dir`: the trackers (`training/tracking.py`)."""
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
    set_here = become_single_process_group() if plugin is not None else []
    several_cpu_processes = launched_world_size() > 1 and not torch.cuda.is_available()
    if plugin is not None and not torch.cuda.is_available():
        # Without a GPU, accelerate does not create a process group by itself under DeepSpeed
        # (every rank then thinks it is alone and trains on all the data): create it on gloo.
        PartialState(backend="gloo")
    accelerator = Accelerator(
        # trackers named by train.tracker (a missing package fails here, before any loading)
        log_with=log_with, project_dir=project_dir,
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
    if torch.distributed.is_initialized():
        # the group exists: a process this one starts must not find its address and port (it
        # would try to open the same port); DeepSpeed still reads the rank variables
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name in set_here:
                os.environ.pop(name)
    return accelerator

