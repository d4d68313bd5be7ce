"""Attention over packed rows, one document at a time (`attn_implementation="sdpa_per_document"`).

transformers' own path gives the whole row a dense block-diagonal mask: every query pays for
every key of the row, and a masked SDPA cannot use the fused causal kernel. Here each document
goes through causal SDPA alone. Anything that is not a packed row (padding, a KV cache, sliding
windows) gets transformers' SDPA unchanged, so generation behaves exactly as with "sdpa".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer_lib.ops.documents import known

DOCUMENT_ATTENTION = "sdpa_per_document"


def document_ids(mask_function, batch_size: int, length: int, device) -> torch.Tensor:
    """[batch, length] document number of every token, read from a transformers mask function:
    a token starts a new document when it may not attend to the token before it."""
    b = torch.arange(batch_size, device=device)[:, None]
    q = torch.arange(1, length, device=device)[None, :]
    sees_previous = mask_function(b, 0, q, q - 1)
    starts = torch.ones(batch_size, length, dtype=torch.long, device=device)
    starts[:, 1:] = (~sees_previous.expand(batch_size, length - 1)).long()
    return starts.cumsum(-1) - 1


def _spans(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, (start, end) of each document; worked out once per forward pass and kept on
    the tensor, which every layer receives."""
    spans = getattr(doc_ids, "_spans", None)
    if spans is None:
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        width = doc_ids.shape[1]
        spans = []
        for row in starts.cpu().tolist():
            cut = [i for i, s in enumerate(row) if s] + [width]
            spans.append(list(zip(cut[:-1], cut[1:])))
        doc_ids._spans = spans
    return spans


def _is_documents(attention_mask) -> bool:
    return (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and attention_mask.dtype == torch.long)


def document_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling=None, is_causal=None, **kwargs):
    """Causal SDPA per document of each row when given document numbers; otherwise
    transformers' SDPA. query/key/value: [batch, heads, length, head_dim]."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not _is_documents(attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, heads, length, _ = query.shape
    # every document of every row, in order: split views of the [batch * length] positions, so
    # that backward is one cat per input (slices would each fill a zero tensor of the whole
    # batch) and the output is one cat, already in the [batch, length, heads, dim] layout (the
    # values' head size, which differs from the queries' in multi-head latent attention)
    sizes = [e - s for row in _spans(attention_mask) for s, e in row]
    q, k, v = (t.transpose(1, 2).reshape(batch * length, heads, t.shape[-1]).split(sizes)
               for t in (query, key, value))
    pieces = [F.scaled_dot_product_attention(
        qd.transpose(0, 1)[None], kd.transpose(0, 1)[None], vd.transpose(0, 1)[None],
        dropout_p=dropout, scale=scaling, is_causal=True)[0].transpose(0, 1)
        for qd, kd, vd in zip(q, k, v)]
    return torch.cat(pieces).view(batch, length, heads, value.shape[-1]), None


def document_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, local_size=None, use_vmap=False, device="cpu", **kwargs):
    """Document numbers for packed rows; transformers' SDPA mask for everything else."""
    from transformers.masking_utils import sdpa_mask

    plain = (attention_mask is not None or local_size is not None or use_vmap
             or mask_function is None or q_length != kv_length or q_length < 2
             or q_offset != 0 or kv_offset != 0)
    if not plain:
        k = known(batch_size, q_length)
        if k is not None:  # the collator's documents: nothing to read from the device
            if k.packed:
                ids = k.numbers.to(device)
                ids._spans = k.spans
                return ids
        else:
            ids = document_ids(mask_function, batch_size, q_length, device)
            if bool((ids[:, -1] > 0).any()):
                return ids
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size, use_vmap=use_vmap,
                     device=device, **kwargs)


def register() -> str:
    """Adds the per-document attention to transformers' registries (idempotent); returns its
    name, for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DOCUMENT_ATTENTION, document_attention_forward)
    AttentionMaskInterface.register(DOCUMENT_ATTENTION, document_mask)
    return DOCUMENT_ATTENTION

