"""The optimiser step, applied only when its loss and gradient norm are finite.

Both are checked on values every process agrees on, before the update. A non-finite step is never
applied: its gradients are dropped and the optimiser and schedule do not move, so the last
checkpoint holds only finite steps. Under DeepSpeed the engine decides in its backward pass and
the loop reads whether it applied the step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from trainer_lib.errors import NonFiniteLossError


def grad_norm_of(parameters) -> torch.Tensor:
    """The global L2 norm of the gradients (without clipping): under DDP every process holds the
    same reduced gradients, under FSDP2 its shard of them; every process gets the same value."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    # FSDP2: each process holds a shard of every gradient; the norm of the whole is reduced
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def step_grad_norm(trainer) -> torch.Tensor | float | None:
    """The step's gradient norm once its gradients are complete, clipped to
    `train.max_grad_norm` when set: a 0-d tensor left on the device (the step reads it with its
    other figures, in one transfer), or under DeepSpeed the engine's own value (it has already
    decided whether to apply the update)."""
    acc, model, t = trainer.accelerator, trainer.model, trainer.config.train
    if acc.distributed_type == DistributedType.DEEPSPEED:
        norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm or 0.0)
        return float(norm) if norm is not None else None
    if t.max_grad_norm is not None:
        norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
    else:
        acc.unscale_gradients()  # fp16: the norm of the true gradients
        norm = grad_norm_of(model.parameters())
    # FSDP2: the norm of the whole from each process's shard
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def apply_update(trainer, loss: float, norm: Optional[float]) -> dict:
    """Applies the step's update unless its loss or gradient norm (`step_grad_norm`, read) is not
    finite; steps the schedule only when the update was applied. Returns {"applied",
    "grad_norm", "nonfinite"} ("nonfinite": the step counts against
    `train.skip_nonfinite_steps`)."""
    acc, model, t = trainer.accelerator, trainer.model, trainer.config.train
    fp16 = t.mixed_precision == "fp16"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        # the engine applied (or, on non-finite gradients, skipped) the update in the last
        # backward pass; its norm is the global one
        applied = model.was_step_applied()
        if applied and not (math.isfinite(loss) and is_finite(norm)):
            raise NonFiniteLossError(
                f"{describe_nonfinite({'loss': loss, 'grad_norm': norm})} at step "
                f"{trainer.step + 1}, and DeepSpeed applied the update (ZeRO-1/2 in bf16 checks "
                "the gradients only with \"check_grad_overflow\": true in the DeepSpeed config's "
                f"bf16 section); nothing was saved from it. {_last_checkpoint(trainer)}")
        nonfinite = not applied and not (fp16 and math.isfinite(loss))
        if applied:
            # a no-op (the engine stepped in backward) that tells the LR scheduler the optimiser
            # stepped, as torch checks before a scheduler step
            trainer.optimizer.step()
    else:
        # with fp16 loss scaling an overflowing gradient under a finite loss is the scaler's
        # to skip; anything else non-finite is ours
        nonfinite = not math.isfinite(loss) or (not math.isfinite(norm) and not fp16)
        applied = False
        if not nonfinite:
            trainer.optimizer.step()
            applied = not acc.optimizer_step_was_skipped
        elif acc.scaler is not None and acc.native_amp:
            # the gradients were unscaled above; the scaler expects an update() before the next
            # unscale (and lowers its scale for the non-finite gradients, as a skipped step would)
            acc.scaler.update()
    if applied:
        trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"applied": applied, "grad_norm": norm, "nonfinite": nonfinite}


def _last_checkpoint(trainer) -> str:
    last = trainer.checkpoints.last_saved
    return (f"The last good checkpoint is {last}: resume from it with "
            f"train.resume_from_checkpoint={last}" if last else
            "No checkpoint was written before it")


def is_finite(value: Optional[float]) -> bool:
    return value is None or math.isfinite(value)


class NonFiniteSteps:
    """Counts the steps skipped for a non-finite loss or gradient norm and stops the run once
    more are met than `train.skip_nonfinite_steps` allows."""

    def __init__(self, allowed: int, skipped: int = 0):
        self.allowed = allowed
        self.skipped = skipped

    def check(self, out: dict, micro: list, step: int, last_checkpoint: Optional[Path],
              is_main: bool) -> bool:
        """True when the step was skipped for non-finite values (and may be); raises a
        NonFiniteLossError when it may not."""
        if not out.get("nonfinite"):
            return False
        what = describe_nonfinite(out)
        if self.skipped < self.allowed:
            self.skipped += 1
            if is_main:
                print(f"step {step}: {what}; the update was not applied (skipped step "
                      f"{self.skipped} of train.skip_nonfinite_steps={self.allowed})", flush=True)
            return True
        raise NonFiniteLossError(nonfinite_report(what, micro, step, last_checkpoint,
                                                  self.allowed))


def describe_nonfinite(out: dict) -> str:
    loss, norm = out["loss"], out.get("grad_norm")
    if not math.isfinite(loss):
        return f"the training loss is {loss}"
    return f"the gradient norm is {norm} (the loss, {loss:.4g}, is finite)"


def nonfinite_report(what: str, micro: list, step: int, last_checkpoint: Optional[Path],
                     allowed: int = 0) -> str:
    """The error for a non-finite step: where, which batch, what to try, what is kept."""
    micro = [b for b in micro if b is not None]  # a rank short of data joins with None
    first = micro[0] if micro else {}
    ids = first.get("input_ids")
    preview = ids[0][:12].tolist() if torch.is_tensor(ids) and ids.ndim == 2 else None
    tokens = sum(int(b.get("num_tokens", 0)) for b in micro)
    skip = (f"allow skipping a few such steps with train.skip_nonfinite_steps (now {allowed})"
            if allowed else "let such steps be skipped with train.skip_nonfinite_steps=N")
    kept = (f"the last good checkpoint is {last_checkpoint}: resume from it with "
            f"train.resume_from_checkpoint={last_checkpoint} and a lower learning rate (resumed "
            "as it was, the same batches on the same weights fail the same way)"
            if last_checkpoint else "no checkpoint was written before it")
    return (f"{what} at step {step} ({len(micro)} micro-batch(es), {tokens} tokens; first token "
            f"ids of the first row: {preview}). Try a lower learning rate (optimizer.kwargs.lr), "
            f"gradient clipping (train.max_grad_norm), or check this data; or {skip}. The step "
            f"was not applied, and {kept}.")
