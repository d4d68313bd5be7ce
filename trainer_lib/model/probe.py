"""The load-time check: the library's loss path against the model's own forward.

Architectures differ in what follows the output layer (scales, soft caps) and in whether a packed
row keeps its documents apart (ALiBi or learned positions read from the attention mask, SSM and
convolution layers that run across boundaries). No list of names stays complete, so when a model
loads its own forward is run on a few short documents and compared with what the library would
train on:

- the head: the chunked loss's logits (`Head`) against the model's own on a padded batch; on a
  mismatch the loss takes the model's own logits (exact, more memory);
- packing: each document's logits in packed rows against its logits alone, for each way the
  library can pack (restarting position ids, then the boundaries spelled out for mixer layers);
  the first that matches is used, else padded, length-grouped batches;
- a MoE model's load-balancing loss over the real tokens against the model's own `aux_loss`.

Each fallback is said in one line naming the architecture and the difference. A model sharded as
it loads (ZeRO-3 with zero3_init) cannot run a forward pass here: the decision is then taken from
its config, and the run says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from trainer_lib.data.packing import PackedCollator
from trainer_lib.data.padding import padded_collate
from trainer_lib.model.lora import is_peft_model
from trainer_lib.ops.attention import DOCUMENT_ATTENTION
from trainer_lib.ops.attention import register as register_document_attention
from trainer_lib.ops.documents import run_model
from trainer_lib.ops.head import Head, forward_to_head, model_inputs, unwrapped
from trainer_lib.ops.router import RouterLoss, causal_lm

POSITION_IDS = "position_ids"  # packed rows whose position ids restart at every document
BOUNDARIES = "boundaries"  # ... and carry seq_idx / cu_seq_lens for mixer layers
PACKING_MODES = (POSITION_IDS, BOUNDARIES)

# relative logit differences (max |a - b| / max |b|) that count as equal: float32 rounding, or
# the rounding of bfloat16/float16 (and TF32 matmuls), which is about 1% on these probes
TOLERANCE = {"float32": 5e-5, "low": 3e-2}

# the probe's documents: two share a row, one has a row and a padding tail of its own
_DOC_LENGTHS = (9, 6, 11)
_ROWS = ((0, 1), (2,))
_ROW_WIDTH = 16

# Architectures whose packed rows were measured to leak (transformers 5.25), and layer kinds
# that run across documents: used only where the check cannot run (a model sharded as it loads).
KNOWN_LEAKS = frozenset({
    "bamba", "biogpt", "bloom", "falcon_h1", "falcon_mamba", "gpt_oss", "granitemoehybrid",
    "jamba", "lfm2", "lfm2_moe", "mamba", "mamba2", "minimax", "mpt", "nemotron_h", "opt",
    "qwen3_next", "recurrent_gemma", "rwkv", "xlstm", "zamba", "zamba2"})
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention",
                               "attention"})
_MIXER_KEYS = ("hybrid_override_pattern", "attn_layer_indices", "attn_layer_period",
               "ssm_state_size", "mamba_d_state", "state_size", "alibi")


@dataclass
class LossPath:
    """How the library's loss reads a model: its head, how packed rows keep documents apart
    (`packing`: POSITION_IDS, BOUNDARIES, or None for padded batches), the MoE load-balancing
    term, and what was said about it (one line each, for the log)."""

    head: Head = field(default_factory=Head)
    packing: Optional[str] = POSITION_IDS
    router: RouterLoss = field(default_factory=RouterLoss)
    notes: list = field(default_factory=list)
    checked: bool = True


def architecture(model) -> str:
    lm = causal_lm(model)
    return f"{type(lm).__name__} ({getattr(lm.config, 'model_type', '?')})"


def sharded_at_load(model) -> bool:
    """Parameters partitioned by ZeRO-3 as the model was built (zero3_init)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def switch_attention(model, name: str) -> bool:
    """Moves the model to attention implementation `name` (the library's per-document attention
    is registered first); False, unchanged, where the model refuses it."""
    base = model.get_base_model() if is_peft_model(model) else unwrapped(model)
    if getattr(base.config, "_attn_implementation", None) == name:
        return True
    if name == DOCUMENT_ATTENTION:
        register_document_attention()
    try:
        base.set_attn_implementation(name)
    except (ValueError, KeyError, ImportError):
        return False
    return base.config._attn_implementation == name


def attention_of(model) -> Optional[str]:
    base = model.get_base_model() if is_peft_model(model) else unwrapped(model)
    return getattr(base.config, "_attn_implementation", None)


def check_model(model, pad_token_id: int, *, packing: bool, attentions: tuple = (),
                router_aux_loss_coef: Optional[float] = None) -> LossPath:
    """Runs the load-time check on a loaded (not yet wrapped) model; returns the path to train
    on. `attentions`: attention implementations to try for packed rows before the model's own
    (the first that keeps documents apart is kept; the model is left on it)."""
    lm = causal_lm(model)
    router = RouterLoss.of(model, router_aux_loss_coef)
    name = architecture(model)
    if sharded_at_load(model):
        return _from_config(lm.config, packing, router, name, attentions, model)
    path = LossPath(head=Head.of(lm.config), router=router)
    tolerance = _tolerance(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            docs = _documents(lm, pad_token_id)
            _check_head(model, path, docs, pad_token_id, tolerance, name)
            if packing:
                _check_packing(model, path, docs, pad_token_id, tolerance, name, attentions)
            else:
                path.packing = None
    finally:
        model.train(was_training)
    return path


def decision(path: LossPath, model) -> tuple:
    """What a check decided, as plain values (to share between processes)."""
    return (path.head.own_logits, path.packing, attention_of(model),
            path.router.over_tokens is not None)


def adopt(path: LossPath, model, decided: tuple) -> None:
    """Makes `path` (and the model's attention) the one `decided`, so that every process trains
    on the main process's decision even where rounding near the tolerance would differ."""
    own_logits, packing, attention, token_mask = decided
    path.head = replace(path.head, own_logits=own_logits)
    path.packing = packing
    if attention is not None:
        switch_attention(model, attention)
    if not token_mask:
        path.router = path.router.without_token_mask()


def _tolerance(model) -> float:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    exact = dtype in (torch.float32, torch.float64) and (
        torch.get_float32_matmul_precision() == "highest")
    return TOLERANCE["float32" if exact else "low"]


def _documents(lm, pad_token_id: int) -> list[dict]:
    """Short documents of tokens drawn from a fixed seed (the same on every process)."""
    embeddings = lm.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or lm.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    docs = []
    for n in _DOC_LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=generator)
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab  # a pad inside would be odd
        docs.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return docs


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (logits are small in a freshly initialised model)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _check_head(model, path: LossPath, docs, pad_token_id, tolerance, name) -> None:
    """The chunked loss's logits against the model's own, on a padded batch; and the MoE term."""
    batch = _to(padded_collate(docs, pad_token_id), _device(model))
    hidden, out = forward_to_head(model, model_inputs(batch), keep_logits=True,
                                  **path.router.forward_kwargs)
    real = batch["attention_mask"].bool()
    own = out.logits
    if hidden is None:
        path.head = replace(path.head, own_logits=True)
        path.notes.append(f"{name}: its output layer (get_output_embeddings()) is not what makes "
                          "its logits; training on the model's own logits (exact, more memory)")
    else:
        lm_head = unwrapped(model).get_output_embeddings()
        ours = path.head.logits(lm_head(hidden))
        difference = _difference(ours[real], own[real])
        if not difference <= tolerance:
            path.notes.append(
                f"{name}: the chunked loss's logits (head {path.head.describe()}) differ from the "
                f"model's own by {difference:.2g} (relative); training on the model's own logits "
                "(exact, more memory)")
            path.head = replace(path.head, own_logits=True)
    if path.router.over_tokens is not None:
        ours = path.router.aux_loss(out, batch["attention_mask"])
        if not _difference(ours, out.aux_loss) <= tolerance:
            path.router = path.router.without_token_mask()


def _check_packing(model, path: LossPath, docs, pad_token_id, tolerance, name,
                   attentions) -> None:
    """Each document's logits in packed rows against its logits alone, for each candidate."""
    device = _device(model)
    own = attention_of(model)
    alone = [model(**model_inputs(_to(padded_collate([d], pad_token_id), device)),
                   use_cache=False).logits[0] for d in docs]
    candidates = [(a, POSITION_IDS) for a in attentions if a != own]
    candidates += [(own, mode) for mode in PACKING_MODES]
    first, refused = None, None
    for attention, mode in candidates:
        if not switch_attention(model, attention):
            continue
        collate = PackedCollator(pad_token_id, _ROW_WIDTH, None, boundaries=mode == BOUNDARIES)
        batch = _to(collate([[docs[i] for i in row] for row in _ROWS]), device)
        try:
            logits = run_model(model, model_inputs(batch), use_cache=False).logits
        except Exception as e:  # noqa: BLE001 - a path the model refuses is not taken
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        else:
            difference = max(_difference(logits[r, start:start + len(docs[i]["input_ids"])],
                                         alone[i])
                             for r, row in enumerate(_ROWS)
                             for i, start in zip(row, _starts(docs, row)))
            if difference <= tolerance:
                path.packing = mode
                if mode == BOUNDARIES:
                    path.notes.append(f"{name}: packed rows carry seq_idx and cu_seq_lens, which "
                                      "its mixer layers need to keep documents apart")
                if refused is not None:
                    path.notes.append(f"{name}: {refused[0]} attention does not keep packed "
                                      f"documents apart ({refused[1]}); packed rows use its own "
                                      f"{own} attention")
                return
            reason = f"they differ from each alone by {difference:.2g}"
        if attention != own and refused is None:
            refused = (attention, reason)
        if attention == own and first is None:
            first = reason
    switch_attention(model, own)
    path.packing = None
    path.notes.append(
        f"{name}: documents packed in one row do not keep the log-probs they have alone "
        f"({first or 'no way to pack it'}); training on padded, length-grouped "
        "batches instead")


def _starts(docs, row) -> list[int]:
    starts, at = [], 0
    for i in row:
        starts.append(at)
        at += len(docs[i]["input_ids"])
    return starts


def packing_from_config(config) -> bool:
    """Whether packed rows keep documents apart, judged from the config alone (no forward)."""
    if getattr(config, "model_type", "") in KNOWN_LEAKS:
        return False
    kinds = set(getattr(config, "layer_types", None) or []) | set(
        getattr(config, "block_types", None) or [])
    if kinds - _ATTENTION_LAYERS:
        return False
    return not any(getattr(config, key, None) for key in _MIXER_KEYS)


def _from_config(config, packing: bool, router: RouterLoss, name: str, attentions,
                 model) -> LossPath:
    path = LossPath(head=Head.of(config), router=router, checked=False)
    path.packing = POSITION_IDS if packing and packing_from_config(config) else None
    if path.packing is not None:
        for attention in attentions:
            if switch_attention(model, attention):
                break
    packing_said = ("packed" if path.packing else "padded, length-grouped batches" if packing
                    else "padded (method.packing=false)")
    path.notes.append(
        f"{name}: the load-time check cannot run on a model sharded as it loads (ZeRO-3 with "
        f"zero3_init); decided from its config, unchecked: head {path.head.describe()}, "
        f"{packing_said}")
    return path
