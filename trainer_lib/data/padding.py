"""Ordering and padding for unpacked training: length-grouped batches, right padding."""

from __future__ import annotations

import random

import numpy as np
import torch

from trainer_lib.ops.cross_entropy import IGNORE_INDEX
from trainer_lib.ops.documents import host_padding


def length_grouped_order(lengths, batch_size: int, seed: int, mega_batch_mult: int = 50
                         ) -> list[int]:
    """A permutation of range(len(lengths)) where neighbours have similar lengths.

    As in the Hugging Face Trainer: shuffle, cut into mega-batches of `mega_batch_mult *
    batch_size`, sort each by length (longest first), and move the longest example of all to the
    front so that an out-of-memory error shows on the first step. The multiplier is lowered for
    small datasets so that there are at least 4 mega-batches to shuffle. Same seed, same order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    mult = max(1, min(mega_batch_mult, n // (4 * batch_size)))
    size = mult * batch_size
    shuffled = list(range(n))
    random.Random(seed).shuffle(shuffled)  # the order trainer_lib has always drawn for a seed
    order = np.asarray(shuffled, dtype=np.int64)
    position = np.arange(n)
    # by mega-batch, then longest first, ties in shuffled order
    order = order[np.lexsort((position, -lengths[order], position // size))]
    firsts = np.arange(0, n, size)
    longest = int(firsts[np.argmax(lengths[order[firsts]])])
    order[0], order[longest] = order[longest], order[0]
    return order.tolist()


class LengthGroupedSampler(torch.utils.data.Sampler):
    """`length_grouped_order` as a sampler: a new grouping each epoch (seed + epoch), so the
    order is a function of (seed, epoch) alone, which exact resume relies on."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch))

    def __len__(self) -> int:
        return len(self.lengths)


def padded_collate(examples: list[dict], pad_token_id: int, width: int | None = None) -> dict:
    """Right-padded batch: input_ids, labels, attention_mask (LongTensor [B, T]), num_tokens,
    num_loss_tokens (Python ints).

    `width` pads every batch to one length (equal shapes on every process, as ZeRO-3 needs).
    Position 0 is never predicted, so its label is set to -100 here: num_loss_tokens then counts
    exactly the tokens that carry loss, as for packed batches.
    """
    if not examples:
        raise ValueError("padded_collate needs at least one example")
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) != len(ex["labels"]) or len(ex["input_ids"]) == 0:
            raise ValueError(
                f"example {i} of the batch has {len(ex['input_ids'])} input_ids and {len(ex['labels'])} "
                "labels; they must be equal and non-zero"
            )
    width = width or max(len(ex["input_ids"]) for ex in examples)
    # built in numpy and counted there: the counts are plain host arithmetic, never a read of a
    # tensor (which the training step keeps to its two exchanges with the device)
    input_ids = np.full((len(examples), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(examples), width), dtype=np.int64)
    for r, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[r, :n] = ex["input_ids"]
        labels[r, :n] = ex["labels"]
        attention_mask[r, :n] = 1
    labels[:, 0] = IGNORE_INDEX
    return dict(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        attention_mask=torch.from_numpy(attention_mask),
        num_tokens=int(attention_mask.sum()),
        num_loss_tokens=int(np.count_nonzero(labels != IGNORE_INDEX)),
        **host_padding(attention_mask),
    )
