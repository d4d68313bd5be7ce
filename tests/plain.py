"""Plain whole-list versions of steps the library runs per sample, per batch or inside a trainer,
for tests to check against (or to drive the per-sample functions the way the pipeline does)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np
import torch

from trainer_lib.data.packing import best_fit_decreasing
from trainer_lib.errors import DataError, KTODataError
from trainer_lib.methods.kto.loss import kto_loss as _kto_loss
from trainer_lib.methods.kto.loss import reference_point
from trainer_lib.methods.kto.samples import KIND_NAMES, kto_sample_form, normalize_kto_sample
from trainer_lib.methods.sft.samples import (
    mixed_forms_message,
    normalize_sft_sample,
    sft_sample_form,
)
from trainer_lib.ops.cross_entropy import IGNORE_INDEX


def normalize_sft_samples(samples: list, text_key: str = "text", input_key: str = "prompt",
                          output_key: str = "completion") -> list[dict]:
    """Every sample checked and turned into a record, as the pipeline does one by one."""
    if len(samples) == 0:
        raise DataError("samples is empty: give at least one training sample")
    keys = (text_key, input_key, output_key)
    forms = [sft_sample_form(s, i, *keys) for i, s in enumerate(samples)]
    for i, form in enumerate(forms):
        if form != forms[0]:
            raise DataError(mixed_forms_message(i, form, forms[0]))
    return [normalize_sft_sample(s, i, forms[0], *keys) for i, s in enumerate(samples)]


def normalize_kto_samples(samples: Iterable[Any], input_key: str = "prompt",
                          output_key: str = "completion", label_key: str = "label") -> list[dict]:
    """KTO samples in any accepted format -> records, as the pipeline does one by one."""
    records: list[dict] = []
    first_kind = None
    for index, sample in enumerate(samples):
        kind = kto_sample_form(sample, index, input_key, output_key, label_key)
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise KTODataError(
                f"sample {index} is {KIND_NAMES[kind]} but sample 0 is {KIND_NAMES[first_kind]}; "
                "all samples must have the same format")
        records.extend(normalize_kto_sample(sample, kind, index, input_key, output_key,
                                            label_key))
    if not records:
        raise KTODataError("no KTO samples were given")
    return records


def fixed_micro_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """KTO's fixed micro-batches as lists of example indices: a seeded permutation cut into
    runs of `batch_size`, a lone last example joining the run before it."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


def count_loss_tokens(labels: list) -> int:
    """Tokens that carry loss once labels are shifted (the first position is never a target)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def pack_dataset(examples: list[dict], seq_length: int) -> list[list[dict]]:
    """Examples grouped into rows of at most `seq_length` tokens (best fit decreasing)."""
    lengths = []
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > seq_length:
            raise ValueError(f"example {i} has {n} tokens, more than seq_length={seq_length}")
        lengths.append(n)
    return [[examples[i] for i in row] for row in best_fit_decreasing(lengths, seq_length)]


def sequence_logps(nll: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-probability of the labelled tokens from per-token NLL aligned with
    `labels` (position 0 never counts): (sum [B], token count [B])."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return -(nll * mask).sum(-1), mask.sum(-1)


def completion_logps(token_logps: torch.Tensor, completion_mask: torch.Tensor,
                     average: bool = False) -> torch.Tensor:
    """[B, T] token log-probs -> [B], summed (or averaged) over the completion tokens."""
    mask = completion_mask.bool()
    summed = token_logps.masked_fill(~mask, 0.0).sum(-1)
    if not average:
        return summed
    return summed / mask.sum(-1).clamp(min=1).to(summed.dtype)


def kto_loss(policy_logps, ref_logps, kl_policy_logps: Optional[torch.Tensor],
             kl_ref_logps: Optional[torch.Tensor], is_desirable, *, z=None, reduce_sum=None,
             **kwargs):
    """The library's `kto_loss`, with z estimated from the given mismatched pairs when it is
    not given (as the trainer does over a whole step)."""
    if z is None and kwargs.get("loss_type", "kto") == "kto" and kl_policy_logps is not None \
            and kl_policy_logps.numel():
        diff = kl_policy_logps.detach().double() - kl_ref_logps.detach().double()
        totals = torch.stack([diff.sum(), diff.new_tensor(float(diff.numel()))])
        if reduce_sum is not None:
            totals = reduce_sum(totals)
        z = reference_point(totals[0], totals[1])
    return _kto_loss(policy_logps, ref_logps, is_desirable, z=z, **kwargs)
