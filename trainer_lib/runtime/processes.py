"""What several processes do together: share a value or an error, take turns, sum figures.

With one process every helper is a plain call.
"""

from __future__ import annotations

import os
import pickle
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun, accelerate launch and deepspeed all set
    WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def device_vector(values: list, device) -> torch.Tensor:
    """A float64 vector on `device` of host numbers and 0-d tensors, in order, made without
    reading anything back: the tensors stay where they are, the numbers go over in copies that
    do not wait for the device's queue."""
    pieces, numbers = [], []
    for v in values:
        if torch.is_tensor(v):
            if numbers:
                pieces.append(_to(torch.tensor(numbers, dtype=torch.float64), device))
                numbers = []
            pieces.append(v.detach().reshape(1).to(device=device, dtype=torch.float64))
        else:
            numbers.append(float(v))
    if numbers or not pieces:
        pieces.append(_to(torch.tensor(numbers, dtype=torch.float64), device))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    return t if t.device == torch.device(device) else t.to(device, non_blocking=True)


def reduce_sum(accelerator: Accelerator, values: list | torch.Tensor) -> torch.Tensor:
    """Sums a small vector of numbers (host numbers or 0-d tensors) over all processes (one
    collective call); the result stays on the device, unread."""
    t = values if torch.is_tensor(values) else device_vector(values, accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t


def on_main_process(accelerator, fn: Callable[[], Any]) -> Any:
    """`fn()` run on the main process, its result given to every process; an exception raised
    there is raised on every process, with the same type and message."""
    if accelerator.num_processes == 1:
        return fn()
    payload: list = [None]
    error = None
    if accelerator.is_main_process:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - sent to the other processes, then raised
            error, payload = e, [("error", portable_error(e))]
    broadcast_object_list(payload)
    status, value = payload[0]
    if error is not None:
        raise error  # the original, with its traceback, where it happened
    if status == "error":
        raise rebuilt_error(*value)
    return value


@contextmanager
def all_or_none(accelerator) -> Iterator[None]:
    """A block every process runs, then one collective (a summed failure flag): when the block
    raised on any process, it raises on every one, so none is left waiting for the others at
    their next collective. The process where it happened raises its own error; the others the
    first failing process's type and message. The block must call the same collectives on every
    process up to where it can fail."""
    if accelerator is None or accelerator.num_processes == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - agreed on with the other processes below
        error = e
    if not int(reduce_sum(accelerator, [error is not None])[0]):
        return
    shared = (*portable_error(error), getattr(error, "errno", None)) if error else None
    failures = [f for f in gather_object([shared]) if f]
    if error is not None:
        raise error
    cls, message, code = failures[0]
    rebuilt = rebuilt_error(cls, message)
    if code is not None and isinstance(rebuilt, OSError):
        rebuilt.errno = code
    raise rebuilt


def rebuilt_error(cls: type, message: str) -> Exception:
    """An error of type `cls` with `message`, as another process raised it (a RuntimeError naming
    the type when `cls` does not take one message)."""
    try:
        return cls(message)
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{cls.__name__}: {message}")


def main_first(accelerator, prepare: Callable[[], Any]) -> Any:
    """`prepare()` on each node's main process first, then on the others (which then find its
    files). An error on the main process is raised on every process, with its message, instead of
    leaving the others waiting."""
    if accelerator is None or accelerator.num_processes == 1:
        return prepare()
    value, failure, error = None, [None], None
    if accelerator.is_local_main_process:
        try:
            value = prepare()
        except Exception as e:  # noqa: BLE001 - shared with the other processes below
            error, failure = e, [portable_error(e)]
    # every node's outcome, so that a failure on any node stops all of them
    failures = [f for f in gather_object(failure) if f is not None]
    if error is not None:
        raise error
    if failures:
        raise rebuilt_error(*failures[0])
    if not accelerator.is_local_main_process:
        value = prepare()
    return value


def portable_error(e: Exception) -> tuple[type, str]:
    """(type, message) of `e` that can be sent to the other processes and raised there: a class
    that cannot be pickled travels as a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(type(e)))
        return type(e), str(e)
    except Exception:  # noqa: BLE001 - a class that cannot travel: its name and message do
        return RuntimeError, f"{type(e).__name__}: {e}"


def shared_value(accelerator, value: Any) -> Any:
    """The global main process's `value`, on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box)
    return box[0]


def shared_token(accelerator) -> str:
    """A random name every process agrees on (the global main's)."""
    return shared_value(accelerator, uuid.uuid4().hex[:12])
