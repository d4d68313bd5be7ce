"""The layout of a batch's rows as the collator knows it on the host.

transformers works the layout out on the device and reads the answer back to the host, a wait
for the device in every forward pass: whether rows are packed and where their documents start
(`find_packed_sequence_indices`, from the position ids), and whether a padded batch has any
padding (`_ignore_causal_mask_sdpa`, from the attention mask). Per-document attention needs each
document's span on the host as well. The collator knows all of it before the batch reaches the
device (`host_documents`, `host_padding`); `run_model` hands it to the forward: while it runs,
transformers' two lookups answer from it (by the same rules: a document starts where the
position ids do not go up by one; a batch without padding skips the mask), and per-document
attention takes its spans from the host lists. Anything the collator did not describe (another
shape, a sliding window, generation with a cache) goes to transformers' own code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch

# a packed batch's keys: the document number of each token within its row (int64 [B, T]) and,
# per row, the (start, end) of each document; a padded batch's: whether no row has padding.
# `model_inputs` carries them to `run_model`
DOCUMENTS, SPANS, FULL_ROWS = "documents", "document_spans", "rows_full"
DOCUMENT_KEYS = (DOCUMENTS, SPANS, FULL_ROWS)


def host_documents(positions: np.ndarray) -> dict:
    """`documents` and `document_spans` of rows whose position ids are `positions` [B, T]."""
    starts = np.ones(positions.shape, dtype=bool)
    starts[:, 1:] = np.diff(positions, axis=-1) != 1
    numbers = np.cumsum(starts, axis=-1) - 1
    width = positions.shape[1]
    spans = []
    for row in starts:
        cut = np.flatnonzero(row).tolist() + [width]
        spans.append(list(zip(cut[:-1], cut[1:])))
    return {DOCUMENTS: torch.from_numpy(numbers), SPANS: spans}


def host_padding(attention_mask: np.ndarray) -> dict:
    """`rows_full` of a padded batch with this attention mask [B, T]."""
    return {FULL_ROWS: bool(attention_mask.all())}


class _Layout:
    """What the collator said about the batch of the running forward."""

    def __init__(self, inputs: dict):
        self.numbers, self.spans = inputs.get(DOCUMENTS), inputs.get(SPANS)
        self.full_rows = inputs.get(FULL_ROWS)
        self.packed = self.spans is not None and any(len(row) > 1 for row in self.spans)
        ids = inputs.get("input_ids")
        self.shape = None if ids is None else tuple(ids.shape[:2])

    def documents(self, batch_size: int, length: int) -> bool:
        return self.numbers is not None and self.shape == (batch_size, length)


_layout: Optional[_Layout] = None
_transformers = {}  # transformers' own functions, where ours stand in front of them


def known(batch_size: int, length: int) -> Optional[_Layout]:
    """The collator's layout of the running forward's rows, if they are of this shape and it
    described their documents."""
    return _layout if _layout is not None and _layout.documents(batch_size, length) else None


def _find_packed_sequence_indices(position_ids: torch.Tensor):
    k = known(*position_ids.shape) if position_ids.dim() == 2 else None
    if k is None:
        return _transformers["find_packed_sequence_indices"](position_ids)
    return k.numbers if k.packed else None  # transformers' None: one document per row


def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset,
                             local_attention_size=None):
    k = _layout
    if (k is not None and k.full_rows is not None and padding_mask is not None
            and tuple(padding_mask.shape) == k.shape == (k.shape[0], q_length)
            and kv_length == q_length and q_offset == 0 and kv_offset == 0
            and local_attention_size is None and not torch.compiler.is_compiling()):
        return k.full_rows  # a batch without padding needs no mask: SDPA's is_causal
    return _transformers["_ignore_causal_mask_sdpa"](padding_mask, q_length, kv_length, q_offset,
                                                     kv_offset, local_attention_size)


def _install() -> None:
    """Puts the lookups above in front of transformers' own (once; each defers to it whenever
    the collator did not describe the batch)."""
    from transformers import masking_utils

    for name, ours in (("find_packed_sequence_indices", _find_packed_sequence_indices),
                       ("_ignore_causal_mask_sdpa", _ignore_causal_mask_sdpa)):
        current = getattr(masking_utils, name, None)
        if current is not None and current is not ours:
            _transformers[name] = current
            setattr(masking_utils, name, ours)


@contextmanager
def layout_known(inputs: dict) -> Iterator[None]:
    global _layout
    if not any(key in inputs for key in DOCUMENT_KEYS):
        yield
        return
    _install()
    outer, _layout = _layout, _Layout(inputs)
    try:
        yield
    finally:
        _layout = outer


def run_model(model, inputs: dict, **forward) -> Any:
    """`model(**inputs, **forward)`, with what the collator knows of the rows' layout (the
    `DOCUMENT_KEYS` among `inputs`) given to transformers' mask code."""
    forward_inputs = {k: v for k, v in inputs.items() if k not in DOCUMENT_KEYS}
    with layout_known(inputs):
        return model(**forward_inputs, **forward)
