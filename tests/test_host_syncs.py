"""At most 2 host synchronisations per optimiser step in SFT and KTO, whatever the accumulation
and the sequence length.

On a GPU every read of a device value on the host waits for the device's queue to drain. On CPU
they are counted as the dispatches of `aten::_local_scalar_dense`, `aten::equal` and
`aten::is_nonzero` (what `.item()`, `float(t)`, `bool(t)` do), of `aten::nonzero` and
`aten::masked_select` and of indexing with a boolean mask (whose result's size must be read
first), plus the calls of `Tensor.tolist` and `Tensor.cpu`, which read a device tensor without
such a dispatch. Everything a step does is counted: fetching and collating its micro-batches,
the forward and backward passes, the optimiser step, the progress bar and the log line (logged
at every step). A step's cost is the difference between runs of 4 and of 2 more steps of one
trainer, so that what a run does once (its first batch, the last step's checkpoint) cancels
out.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer_lib import default_kto_config, default_sft_config
from trainer_lib.methods.kto.trainer import KTOTrainer
from trainer_lib.methods.sft.trainer import SFTTrainer

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
            torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.masked_select.default}
READS = ("tolist", "cpu")
WORDS = "alpha beta gamma delta word1 token2 word3 token4 word5 token6".split()


def _is_sync(func, args) -> bool:
    if func in SYNC_OPS:
        return True
    # x[mask]: the size of the result is the mask's count, read on the host
    return func is torch.ops.aten.index.Tensor and any(
        i is not None and i.dtype == torch.bool for i in args[1])


class HostSyncs(TorchDispatchMode):
    """Counts host synchronisations while active (see the module's docstring)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def _samples(method: str, seq_length: int) -> list[dict]:
    # completions long enough that a row holds a few documents, at either sequence length
    repeat = max(1, seq_length // 64)
    rows = [{"prompt": f"sample {i} " + " ".join(WORDS[:1 + i % 7]),
             "completion": " " + " ".join(WORDS[i % 5:] * repeat)} for i in range(256)]
    if method == "kto":
        for i, row in enumerate(rows):
            row["label"] = i % 2 == 0
    return rows


def _steps_cost(trainer, steps: int) -> int:
    """Host syncs of `steps` more optimiser steps of `trainer` (its loop run again, further)."""
    trainer.total_steps = trainer.step + steps
    with HostSyncs() as syncs:
        trainer.train()
    return syncs.count


@pytest.mark.parametrize("method", ["sft", "kto", "sft-padded", "kto-padded"])
@pytest.mark.parametrize("accumulation,seq_length", [(4, 128), (8, 128), (4, 256)])
def test_a_step_costs_at_most_two_host_syncs(method, accumulation, seq_length, tiny_model_dir,
                                             tmp_path):
    method, _, padded = method.partition("-")
    base = default_kto_config() if method == "kto" else default_sft_config()
    config = base.evolve(
        method=dict(packing=not padded),
        model=dict(model_path=tiny_model_dir),
        train=dict(seq_length=seq_length, batch_size=2, gradient_accumulation_steps=accumulation,
                   epochs=100, log_interval=1, eval_interval=10**6, checkpoint_interval=10**6,
                   checkpoint_dir=str(tmp_path / "ckpts"), logging_dir=str(tmp_path / "logs"),
                   progress_bar=True),
        optimizer=dict(kwargs=dict(lr=1e-3)))
    trainer = (KTOTrainer if method == "kto" else SFTTrainer)(
        config, samples=_samples(method, seq_length))
    _steps_cost(trainer, 2)  # the first steps, and everything done once
    two, four = _steps_cost(trainer, 2), _steps_cost(trainer, 4)
    per_step = (four - two) / 2
    assert per_step <= 2, f"{method}: {per_step} host syncs per optimiser step"
    assert trainer.log_history[-1]["step"] == 8 and "loss" in trainer.log_history[-1]
