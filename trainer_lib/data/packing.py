"""Packing tokenised examples into rows of at most `seq_length` tokens, best fit decreasing.

A packed row carries `position_ids` that restart at 0 for every document and no
`attention_mask`: transformers turns the restarts into a block-diagonal mask (an all-ones mask
would switch that off and let documents see each other). Each document's first label is -100, so
nothing is predicted across a boundary. The pad tail is one more document, so pad queries never
meet an empty row. Models whose mixer layers (SSM, convolution) need the boundaries spelled out
get them too (`boundaries=True`: `seq_idx`, `cu_seq_lens_q/k`, `max_length_q/k`, as transformers'
padding-free collator names them); the load-time check (`trainer_lib.model.probe`) decides.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort

import numpy as np
import torch

from trainer_lib.ops.cross_entropy import IGNORE_INDEX
from trainer_lib.ops.documents import host_documents


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity`.

    Longest first (ties by index); each goes to the open bin with the least room that still fits
    it (ties: the earliest bin), else to a new bin. Deterministic; O(n log n).
    """
    flat, offsets = pack_lengths(lengths, capacity)
    return [flat[offsets[b]:offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]


def pack_lengths(lengths, capacity: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """`best_fit_decreasing` as arrays: bin b holds the indices `flat[offsets[b]:offsets[b + 1]]`
    (in the order they were placed). `progress`, if given, is a tqdm bar advanced per item."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    bad = np.nonzero((lengths < 1) | (lengths > capacity))[0]
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"item {i} has length {int(lengths[i])}; every length must be between 1 "
                         f"and the capacity {capacity}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, ties by index
    bin_of = np.empty(len(order), dtype=np.int64)  # the bin of the k-th item placed
    n_bins = 0
    room_values: list[int] = []  # sorted, distinct: the room left in some open bin
    bins_with_room: dict[int, list[int]] = {}  # room -> heap of bin numbers
    for k, need in enumerate(lengths[order].tolist()):
        j = bisect_left(room_values, need)
        if j == len(room_values):
            b, room = n_bins, capacity - need
            n_bins += 1
        else:
            room = room_values[j]
            heap = bins_with_room[room]
            b = heapq.heappop(heap)
            if not heap:
                del bins_with_room[room]
                room_values.pop(j)
            room -= need
        bin_of[k] = b
        if room > 0:
            if room in bins_with_room:
                heapq.heappush(bins_with_room[room], b)
            else:
                bins_with_room[room] = [b]
                insort(room_values, room)
        if progress is not None and k % 10_000 == 9_999:
            progress.update(10_000)
    if progress is not None:
        progress.update(len(order) % 10_000)
    flat = order[np.argsort(bin_of, kind="stable")]
    offsets = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bin_of, minlength=n_bins), out=offsets[1:])
    return flat, offsets


class PackedCollator:
    """Turns a list of rows (each a list of examples) into one packed batch.

    Returns input_ids, labels, position_ids (LongTensor [B, L]) and the counts num_tokens
    (non-pad tokens) and num_loss_tokens (labels != -100), as Python ints; with `boundaries`
    also seq_idx (int32 [B, L]: the document of each token within its row), cu_seq_lens_q/k
    (int32: where each document starts in the flattened rows) and max_length_q/k (ints).
    """

    def __init__(self, pad_token_id: int, seq_length: int, pad_to_multiple_of: int | None = 64,
                 boundaries: bool = False):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.seq_length = seq_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.boundaries = boundaries

    def __call__(self, rows: list[list[dict]]) -> dict:
        return as_tensors(self.arrays(rows), self.boundaries)

    def arrays(self, rows: list[list[dict]]) -> dict:
        """The batch with numpy arrays in place of tensors."""
        if not rows or any(not row for row in rows):
            raise ValueError("PackedCollator needs a non-empty list of non-empty rows")
        row_lengths = [sum(len(ex["input_ids"]) for ex in row) for row in rows]
        longest = max(row_lengths)
        if longest > self.seq_length:
            raise ValueError(
                f"a row holds {longest} tokens, more than seq_length={self.seq_length}; "
                "build the rows with pack_lengths"
            )
        width = self.seq_length
        if self.pad_to_multiple_of is not None:
            m = self.pad_to_multiple_of
            width = min(self.seq_length, -(-longest // m) * m)

        # built in numpy and counted there: the counts are host arithmetic, never a read of a
        # tensor (which the training step keeps to its two exchanges with the device)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            start = 0
            for ex in row:
                _check_example(ex, None)
                n = len(ex["input_ids"])
                input_ids[r, start : start + n] = ex["input_ids"]
                labels[r, start : start + n] = ex["labels"]
                labels[r, start] = IGNORE_INDEX  # the previous document must not predict it
                position_ids[r, start : start + n] = np.arange(n)
                start += n
            position_ids[r, start:] = np.arange(width - start)  # the pad run: its own segment
        return dict(input_ids=input_ids, labels=labels, position_ids=position_ids,
                    num_tokens=sum(row_lengths),
                    num_loss_tokens=int(np.count_nonzero(labels != IGNORE_INDEX)))


def as_tensors(arrays: dict, boundaries: bool) -> dict:
    """A batch of numpy arrays as tensors, with its documents (`ops.documents`) and, when asked
    for, the boundaries a model's kernels take, all worked out from the arrays on the host."""
    batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
             for k, v in arrays.items()}
    batch.update(host_documents(arrays["position_ids"]))
    if boundaries:
        batch.update(document_boundaries(arrays["position_ids"]))
    return batch


def document_boundaries(positions: np.ndarray) -> dict:
    """seq_idx, cu_seq_lens_q/k and max_length_q/k of packed rows, from their position ids
    (a document starts where they restart at 0)."""
    starts = positions == 0
    seq_idx = (np.cumsum(starts, axis=-1) - 1).astype(np.int32)
    cu = np.append(np.flatnonzero(starts), positions.size).astype(np.int32)
    longest = int(np.diff(cu).max())
    return dict(seq_idx=torch.from_numpy(seq_idx), cu_seq_lens_q=torch.from_numpy(cu),
                cu_seq_lens_k=torch.from_numpy(cu), max_length_q=longest, max_length_k=longest)


def _check_example(ex: dict, index: int | None) -> None:
    where = "an example" if index is None else f"example {index}"
    if "input_ids" not in ex or "labels" not in ex:
        raise ValueError(f"{where} needs the fields input_ids and labels; it has {sorted(ex)}")
    if len(ex["input_ids"]) != len(ex["labels"]):
        raise ValueError(
            f"{where} has {len(ex['input_ids'])} input_ids but {len(ex['labels'])} labels; "
            "labels must be aligned with input_ids (not shifted), -100 where there is no loss"
        )
    if len(ex["input_ids"]) == 0:
        raise ValueError(f"{where} has no tokens")


def pack_documents(documents: list[dict], seq_length: int, pad_token_id: int,
                   pad_to_multiple_of: int | None = 64, num_rows: int | None = None,
                   boundaries: bool = False) -> dict:
    """One batch of documents that must stay apart, packed into as few rows as fit.

    Best fit decreasing over the documents' lengths, then `PackedCollator`; adds
    `document_index` [R, L]: the position in `documents` of the document each token belongs to,
    -1 on padding, so per-document figures (sequence log-probs) can be summed from the rows.
    `num_rows` (with `pad_to_multiple_of=None`) fixes the shape at [num_rows, seq_length] with
    rows of padding, for engines where every process must run the same shapes (ZeRO-3).
    """
    rows = best_fit_decreasing([len(d["input_ids"]) for d in documents], seq_length)
    if num_rows is not None and len(rows) > num_rows:
        raise ValueError(f"{len(documents)} documents need {len(rows)} rows, more than {num_rows}")
    batch = PackedCollator(pad_token_id, seq_length, pad_to_multiple_of).arrays(
        [[documents[i] for i in row] for row in rows])
    width = batch["input_ids"].shape[1]
    index = np.full((len(rows), width), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for i in row:  # PackedCollator lays each row's documents out in this order, from 0
            n = len(documents[i]["input_ids"])
            index[r, start:start + n] = i
            start += n
    batch["document_index"] = index
    extra = (num_rows or len(rows)) - len(rows)
    if extra:  # whole rows of padding: pad tokens, no labels, positions 0, 1, ...
        for name, fill in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX),
                           ("document_index", -1)):
            batch[name] = np.concatenate([batch[name], np.full((extra, width), fill)])
        batch["position_ids"] = np.concatenate([batch["position_ids"],
                                                np.broadcast_to(np.arange(width), (extra, width))])
    return as_tensors(batch, boundaries)
