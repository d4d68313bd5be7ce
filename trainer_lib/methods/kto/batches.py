"""KTO's micro-batches as tensors, and the completion log-probs of their documents."""

from __future__ import annotations

import numpy as np
import torch

from trainer_lib.data.packing import pack_documents
from trainer_lib.data.padding import padded_collate
from trainer_lib.methods.kto.loss import document_logps
from trainer_lib.ops.cross_entropy import IGNORE_INDEX, lm_token_nll, shifted
from trainer_lib.ops.documents import FULL_ROWS
from trainer_lib.ops.head import Head, model_inputs


def kto_batch(examples: list[dict], kl_rows: list[dict], *, pad_token_id: int, seq_length: int,
              packing: bool = True, num_rows: int | None = None,
              boundaries: bool = False) -> dict:
    """One KTO micro-batch from example dicts (`input_ids`, `labels` with -100 where no loss,
    `label`) and their KL rows (prompt i with completion p[i]; none for apo_zero_unpaired).

    Packed: the examples are documents of rows of at most `seq_length` tokens, and so are the KL
    rows, each set with its own `document_index`; unpacked: one padded row per document. With
    `num_rows` every set has that many rows of `seq_length` (fixed shapes for ZeRO-3).
    """
    batch = {}
    for prefix, docs in (("", examples), ("kl_", kl_rows)):
        if not docs:
            continue
        if packing:
            rows = pack_documents(docs, seq_length, pad_token_id,
                                  pad_to_multiple_of=None if num_rows else 64, num_rows=num_rows,
                                  boundaries=boundaries)
            rows.pop("num_tokens")
            rows.pop("num_loss_tokens")
        else:
            padded = padded_collate(docs + [docs[0]] * ((num_rows or len(docs)) - len(docs)),
                                    pad_token_id, seq_length if num_rows else None)
            rows = {k: padded[k] for k in ("input_ids", "labels", "attention_mask", FULL_ROWS)}
            rows["document_index"] = torch.where(
                padded["attention_mask"].bool() & (torch.arange(len(rows["input_ids"]))[:, None]
                                                   < len(docs)),
                torch.arange(len(rows["input_ids"]))[:, None], -1)
        rows.update(kept_positions(rows["labels"], rows["document_index"]))
        batch.update({prefix + k: v for k, v in rows.items()})
    desirable = [bool(ex["label"]) for ex in examples]
    batch["is_desirable"] = torch.tensor(desirable, dtype=torch.bool)
    batch["num_examples"] = len(examples)
    batch["num_desirable"] = sum(desirable)
    batch["num_tokens"] = sum(len(ex["input_ids"]) for ex in examples)
    return batch


def kept_positions(labels: torch.Tensor, document_index: torch.Tensor) -> dict:
    """`keep_index` (the flat positions of [B, T] rows that predict a completion token) and
    `keep_documents` (the document of each), worked out on the host where the batch is built,
    so that selecting them on the device reads nothing back."""
    labels, index = labels.numpy(), document_index.numpy()
    targets = np.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    documents = np.full_like(index, -1)
    documents[:, :-1] = index[:, 1:]
    keep = np.flatnonzero((targets != IGNORE_INDEX) & (documents >= 0))
    return {"keep_index": torch.from_numpy(keep),
            "keep_documents": torch.from_numpy(documents.reshape(-1)[keep])}


def completion_logps(model, batch: dict, prefix: str = "", chunk_size: int | None = None,
                     select: bool = True, head: Head | None = None,
                     **forward) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Summed completion log-probs [D] and completion token counts [D] of the documents of a
    batch's rows (prefix "" for the examples, "kl_" for the KL rows), and the model's output.

    The model's own forward runs (wrappers see the call), asked for no logits; the head and the
    log-softmax then run in chunks (`lm_token_nll`, with the model's `head`) only at the
    positions that predict a completion token (`select`), not at prompts and padding. Under
    ZeRO-3 (`select=False`) every position goes through the head, so every process calls it as
    often. Per-sequence weights make the upstream gradient non-uniform, so the chunked loss
    recomputes logits in backward instead of precomputing uniform gradients (`fused_grads`).
    """
    # position t predicts labels[t + 1], a token of document index[t + 1]; a document's first
    # label is -100, so no position predicts across documents
    targets = shifted(batch[prefix + "labels"])
    keep = batch[prefix + "keep_index"]  # flat positions, found on the host (kept_positions)
    nll, out = lm_token_nll(model, model_inputs(batch, prefix), targets, head,
                            keep=keep if select else None, chunk_size=chunk_size,
                            fused_grads=False, **forward)
    if not select:
        nll = nll.reshape(-1).index_select(0, keep)
    sums, counts = document_logps(-nll, batch[prefix + "keep_documents"],
                                  int(batch["num_examples"]))
    return sums, counts, out
