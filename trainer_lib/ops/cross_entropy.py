"""Per-token negative log-likelihood of a causal LM without the full [tokens, vocab] float32 logits.

The head runs on chunks of tokens, so only one chunk's logits exist at a time and the loss's
memory does not grow with the vocabulary. With a plain linear head, forward also computes the
gradients of a uniform upstream gradient while each chunk's logits are at hand (SFT's mean), so
the backward pass costs no second matmul over the vocabulary; a head whose weight exists only
inside its forward (ZeRO-3, a PEFT wrapper) is recomputed chunk by chunk instead. Under FSDP2
the head is whole from the model's forward to its backward and the plain path reads its weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

# the label of a position that carries no loss (the ignore_index of torch's cross-entropy)
IGNORE_INDEX = -100

# Float32 logits elements per chunk when the chunk size is automatic (128 MiB): the chunk holds
# about 2**25 / vocabulary tokens, so the loss's memory stays flat as the vocabulary grows.
CHUNK_LOGITS_BUDGET = 2**25


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk whose float32 logits fill CHUNK_LOGITS_BUDGET (between 64 and 8192)."""
    return max(64, min(8192, CHUNK_LOGITS_BUDGET // max(1, vocab_size)))


def _vocab_size(lm_head: nn.Module) -> int:
    size = getattr(lm_head, "out_features", None)  # kept by nn.Linear even under ZeRO-3
    if size is None:  # a wrapped head (PEFT): its base layer
        size = getattr(getattr(lm_head, "base_layer", None), "out_features", None)
    return size or 32_768


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """float32 logits of one chunk: the matmul in the hidden dtype, everything after in float32."""
    logits = F.linear(h, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _grad_logits_(logits: Tensor, lse: Tensor, safe_targets: Tensor, scale: Tensor, softcap: float | None) -> Tensor:
    """In place: logits -> d(sum_i scale_i * nll_i)/d(pre-softcap logits), float32."""
    if softcap is not None:
        dcap = 1.0 - (logits / softcap).square()  # d softcap(x) / dx, from the capped value
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, safe_targets[:, None], torch.full_like(lse, -1.0)[:, None])
    probs.mul_(scale[:, None])  # scale is 0 at ignored tokens
    if softcap is not None:
        probs.mul_(dcap)
    return probs


class _ChunkedLinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, fused_grads):
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        nll = hidden.new_zeros(n, dtype=torch.float32)
        lse = hidden.new_zeros(n, dtype=torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        precompute = fused_grads and (need_h or need_w or need_b)
        grad_h = torch.zeros_like(hidden) if precompute and need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if precompute and need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if precompute and need_b else None
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            chunk_valid = valid[sl]
            if not bool(chunk_valid.any()):
                continue  # nothing to predict: nll and grads stay 0
            h = hidden[sl]
            logits = _chunk_logits(h, w, b, softcap)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_targets[sl, None])[:, 0]
            nll[sl] = torch.where(chunk_valid, chunk_lse - target_logit, 0.0)
            lse[sl] = chunk_lse
            if precompute:
                g = _grad_logits_(logits, chunk_lse, safe_targets[sl], chunk_valid.float(), softcap)
                _accumulate(g, h, w, sl, grad_h, grad_w, grad_b)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        ctx.precomputed = (grad_h, grad_w, grad_b) if precompute else None
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        valid = targets != IGNORE_INDEX
        grad_nll = torch.where(valid, grad_nll.float(), 0.0)

        if ctx.precomputed is not None:
            g_valid = grad_nll[valid]
            if g_valid.numel() == 0 or bool((g_valid == g_valid[0]).all()):
                # Uniform upstream gradient: the forward's grads times that one number.
                scale = g_valid[0] if g_valid.numel() else grad_nll.new_zeros(())
                grad_h, grad_w, grad_b = ctx.precomputed
                ctx.precomputed = None
                return (
                    None if grad_h is None else grad_h.mul_(scale.to(grad_h.dtype)),
                    None if grad_w is None else grad_w.mul_(scale).to(weight.dtype),
                    None if grad_b is None else grad_b.mul_(scale).to(bias.dtype),
                    None, None, None, None,
                )
            ctx.precomputed = None  # per-token weights: recompute below

        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        safe_targets = targets.clamp(min=0)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            scale = grad_nll[sl]
            if not bool((scale != 0).any()):
                continue
            h = hidden[sl]
            logits = _chunk_logits(h, w, b, ctx.softcap)
            g = _grad_logits_(logits, lse[sl], safe_targets[sl], scale, ctx.softcap)
            _accumulate(g, h, w, sl, grad_h, grad_w, grad_b)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None,
        )


def _accumulate(g: Tensor, h: Tensor, w: Tensor, sl: slice, grad_h, grad_w, grad_b) -> None:
    """Add one chunk's contribution, given g = dL/dlogits (float32 [chunk, V])."""
    if grad_b is not None:
        grad_b.add_(g.sum(0))
    g = g.to(h.dtype)
    if grad_h is not None:
        grad_h[sl] = g @ w
    if grad_w is not None:
        if g.dtype == torch.float32:
            grad_w.addmm_(g.t(), h)
        else:
            grad_w.add_(g.t() @ h)  # low-precision matmul, float32 accumulation across chunks


def _uses_recompute(lm_head: nn.Module) -> bool:
    weight = getattr(lm_head, "weight", None)
    if isinstance(lm_head, FSDPModule):
        # FSDP2 holds the head whole from the model's forward to its backward (accelerate does
        # not reshard the final norm and head after forward): its weight is used directly, as
        # calling the head module again here would free weights the backward still needs
        if isinstance(weight, DTensor) or not isinstance(lm_head, nn.Linear):
            raise RuntimeError(
                "under FSDP2 the chunked loss needs the output head to be a plain linear layer "
                "kept whole after the forward (accelerate's FSDP2 preparation does so)")
        return False
    return type(lm_head) is not nn.Linear or weight is None or hasattr(weight, "ds_id")


def _checkpointed_chunk(lm_head: nn.Module, softcap: float | None):
    def run(h: Tensor, targets: Tensor) -> Tensor:
        logits = lm_head(h).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)

    return run


def chunked_token_nll(
    hidden: Tensor,
    lm_head: nn.Module,
    targets: Tensor,
    chunk_size: int | None = None,
    softcap: float | None = None,
    recompute: bool | None = None,
    fused_grads: bool = True,
) -> Tensor:
    """Per-token NLL (float32 [N], exactly 0 where `targets == -100`) of `lm_head(hidden)`.

    hidden: [N, H]; targets: [N] long. `chunk_size=None` sizes chunks from the vocabulary
    (`auto_chunk_size`). `recompute=None` picks the checkpointed path for ZeRO-3
    or non-`nn.Linear` heads and the fused path otherwise. `fused_grads` (fused path only):
    precompute gradients in forward; leave on when the loss is a plain sum or mean of the
    result, turn off when the caller weights tokens or sequences differently.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"chunked_token_nll expects hidden [N, H] and targets [N]; got {tuple(hidden.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if chunk_size is None:
        chunk_size = auto_chunk_size(_vocab_size(lm_head))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if recompute is None:
        recompute = _uses_recompute(lm_head)
    if not recompute:
        return _ChunkedLinearNLL.apply(
            hidden, lm_head.weight, lm_head.bias, targets, chunk_size, softcap, fused_grads
        )
    run = _checkpointed_chunk(lm_head, softcap)
    grad = torch.is_grad_enabled()
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        # ZeRO-3 gathers the head weight for the recomputation itself; its shape differs from
        # the partitioned placeholder seen between passes, so the metadata check must be off
        pieces.append(checkpoint(run, h, t, use_reentrant=False, determinism_check="none")
                      if grad else run(h, t))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def causal_lm_token_nll(model: nn.Module, batch: dict, chunk_size: int | None = None, fused_grads: bool = True) -> Tensor:
    """Per-token NLL [B, T] of a Hugging Face causal LM: result[:, t] is the loss of predicting
    `labels[:, t]` from the tokens before it; 0 where labels are -100 and at t = 0.

    The model's own top-level forward runs (so DDP/DeepSpeed wrappers see the call), asked for
    no logits; the head is applied here in chunks to the last hidden state (after the final norm).
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    out = model(
        input_ids=input_ids,
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        output_hidden_states=True,
        logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
        use_cache=False,
    )
    hidden = out.hidden_states[-1]
    bsz, seq_len, hidden_size = hidden.shape
    base = getattr(model, "module", model)
    lm_head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    # Position t predicts labels[:, t + 1]; the last position predicts nothing. Keeping all T
    # positions avoids copying the hidden states for the shift.
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    nll = chunked_token_nll(
        hidden.reshape(bsz * seq_len, hidden_size),
        lm_head,
        targets.reshape(-1),
        chunk_size=chunk_size,
        softcap=softcap,
        fused_grads=fused_grads,
    ).view(bsz, seq_len)
    return F.pad(nll[:, :-1], (1, 0))
