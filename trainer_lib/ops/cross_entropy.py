"""Per-token negative log-likelihood of a causal LM without the full [tokens, vocab] float32 logits.

The head runs on chunks of tokens, so only one chunk's logits exist at a time and the loss's
memory does not grow with the vocabulary. What the model does after its output layer (a scale, a
soft cap: `ops.head.Head`) is applied to each chunk. With a plain linear head, forward also
computes the gradients of a uniform upstream gradient while each chunk's logits are at hand
(SFT's mean), so the backward pass costs no second matmul over the vocabulary; a head whose
weight exists only inside its forward (ZeRO-3, a PEFT wrapper) is recomputed chunk by chunk
instead. A head marked `own_logits` takes the model's own logits, whole. Under FSDP2 the head
is whole from the model's forward to its backward and the plain path reads its weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from trainer_lib.ops.documents import run_model
from trainer_lib.ops.head import Head, forward_to_head, model_inputs, unwrapped

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


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, head: Head) -> Tensor:
    """float32 logits of one chunk: the matmul in the hidden dtype, everything after in float32."""
    return head.logits(F.linear(h, weight, bias))


def _grad_logits_(logits: Tensor, lse: Tensor, safe_targets: Tensor, scale: Tensor,
                  head: Head) -> Tensor:
    """In place: logits -> d(sum_i scale_i * nll_i)/d(output layer's result), float32."""
    if head.softcap is not None:
        dcap = 1.0 - (logits / head.softcap).square()  # d softcap(x) / dx, from the capped value
    if head.scale is not None:
        scale = scale * head.scale  # d(scale * x) / dx, folded into the per-token factor
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, safe_targets[:, None], torch.full_like(lse, -1.0)[:, None])
    probs.mul_(scale[:, None])  # scale is 0 at ignored tokens
    if head.softcap is not None:
        probs.mul_(dcap)
    return probs


class _ChunkedLinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, head, fused_grads):
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        nll = hidden.new_zeros(n, dtype=torch.float32)
        lse = hidden.new_zeros(n, dtype=torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        precompute = bool(fused_grads) and (need_h or need_w or need_b)
        grad_h = torch.zeros_like(hidden) if precompute and need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if precompute and need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if precompute and need_b else None
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            chunk_valid = valid[sl]  # every chunk runs: skipping one would read it on the host
            h = hidden[sl]
            logits = _chunk_logits(h, w, b, head)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_targets[sl, None])[:, 0]
            nll[sl] = torch.where(chunk_valid, chunk_lse - target_logit, 0.0)
            lse[sl] = chunk_lse
            if precompute:
                g = _grad_logits_(logits, chunk_lse, safe_targets[sl], chunk_valid.float(), head)
                _accumulate(g, h, w, sl, grad_h, grad_w, grad_b)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.head, ctx.uniform = chunk_size, head, fused_grads == "uniform"
        ctx.precomputed = (grad_h, grad_w, grad_b) if precompute else None
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        valid = targets != IGNORE_INDEX
        grad_nll = torch.where(valid, grad_nll.float(), 0.0)

        if ctx.precomputed is not None:
            if ctx.uniform:
                # the caller's loss is a plain sum of the result times one number: that number
                # is the gradient at the first token that carries loss (0 when none does),
                # found without reading anything on the host
                first = valid.int().argmax().reshape(1)
                scale = grad_nll.gather(0, first).reshape(())
                uniform = True
            else:
                g_valid = grad_nll[valid]
                uniform = g_valid.numel() == 0 or bool((g_valid == g_valid[0]).all())
                scale = g_valid[0] if g_valid.numel() else grad_nll.new_zeros(())
            if uniform:
                # Uniform upstream gradient: the forward's grads times that one number.
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
            h = hidden[sl]
            logits = _chunk_logits(h, w, b, ctx.head)
            g = _grad_logits_(logits, lse[sl], safe_targets[sl], scale, ctx.head)
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


def _checkpointed_chunk(lm_head: nn.Module, head: Head):
    def run(h: Tensor, targets: Tensor) -> Tensor:
        logits = head.logits(lm_head(h))
        return F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)

    return run


def chunked_token_nll(
    hidden: Tensor,
    lm_head: nn.Module,
    targets: Tensor,
    chunk_size: int | None = None,
    head: Head | None = None,
    recompute: bool | None = None,
    fused_grads: bool | str = True,
) -> Tensor:
    """Per-token NLL (float32 [N], exactly 0 where `targets == -100`) of
    `head.logits(lm_head(hidden))` (`head=None`: the plain logits).

    hidden: [N, H]; targets: [N] long. `chunk_size=None` sizes chunks from the vocabulary
    (`auto_chunk_size`). `recompute=None` picks the checkpointed path for ZeRO-3
    or non-`nn.Linear` heads and the fused path otherwise. `fused_grads` (fused path only):
    precompute gradients in forward; leave on when the loss is a plain sum or mean of the
    result, turn off when the caller weights tokens or sequences differently. With True the
    backward checks that the upstream gradient is uniform (reading one value on the host) and
    recomputes if it is not; "uniform" is the caller's promise that it is (SFT's sum), taken
    without the check, so the pass never waits for the device.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"chunked_token_nll expects hidden [N, H] and targets [N]; got {tuple(hidden.shape)} "
            f"and {tuple(targets.shape)}"
        )
    head = head or Head()
    if chunk_size is None:
        chunk_size = auto_chunk_size(_vocab_size(lm_head))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if recompute is None:
        recompute = _uses_recompute(lm_head)
    if not recompute:
        return _ChunkedLinearNLL.apply(
            hidden, lm_head.weight, lm_head.bias, targets, chunk_size, head, fused_grads
        )
    run = _checkpointed_chunk(lm_head, head)
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


def shifted(labels: Tensor, fill: int = IGNORE_INDEX) -> Tensor:
    """What each position predicts: `labels[:, t + 1]` at t, `fill` at the last position."""
    out = torch.full_like(labels, fill)
    out[:, :-1] = labels[:, 1:]
    return out


def lm_token_nll(model: nn.Module, inputs: dict, targets: Tensor, head: Head | None = None, *,
                 keep: Tensor | None = None, chunk_size: int | None = None,
                 fused_grads: bool | str = True, **forward) -> tuple[Tensor, Any]:
    """(NLL of `targets[:, t]` predicted at position t, the model's output).

    The NLL is float32, 0 where targets are -100: [B, T], or [K] at the positions `keep` names
    (a boolean [B, T] mask, or flat positions, int64 [K], which select without a read on the
    host; the head then runs there only). The model's own forward runs on `inputs` (and
    `forward`, e.g. output_router_logits); the head is applied here in chunks to its output
    layer's input, unless `head.own_logits` (`head=None`: `Head.of` the config).
    """
    head = head or Head.of(unwrapped(model).config)
    if head.own_logits:
        out = run_model(model, inputs, use_cache=False, **forward)
        logits = out.logits
        if keep is not None:
            logits, targets = _select(logits, keep), _select(targets, keep)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="none", ignore_index=IGNORE_INDEX)
        return nll.view(targets.shape), out
    hidden, out = forward_to_head(model, inputs, **forward)
    if hidden is None:
        raise RuntimeError(
            f"{type(unwrapped(model)).__name__} did not call its output layer "
            "(get_output_embeddings()) on its hidden states, so the chunked loss cannot read "
            "them; the load-time check moves such a model to its own logits, but it cannot run "
            "on a model sharded as it loads (ZeRO-3 with zero3_init): load it unsharded")
    lm_head = unwrapped(model).get_output_embeddings()
    if keep is not None:
        h, t = _select(hidden, keep), _select(targets, keep)
    else:
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    nll = chunked_token_nll(h, lm_head, t, chunk_size=chunk_size, head=head,
                            fused_grads=fused_grads)
    return nll.view(t.shape if keep is not None else targets.shape), out


def _select(x: Tensor, keep: Tensor) -> Tensor:
    """The positions of [B, T, ...] `x` that `keep` names: a boolean [B, T] mask, or flat
    positions (int64 [K]), which select without reading anything on the host."""
    if keep.dtype == torch.bool:
        return x[keep]
    return x.reshape(-1, *x.shape[2:]).index_select(0, keep)


def causal_lm_token_nll(model: nn.Module, batch: dict, chunk_size: int | None = None,
                        fused_grads: bool = True, head: Head | None = None) -> Tensor:
    """Per-token NLL [B, T] of a Hugging Face causal LM: result[:, t] is the loss of predicting
    `labels[:, t]` from the tokens before it; 0 where labels are -100 and at t = 0.
    (`lm_token_nll` on the batch's inputs, aligned with the labels.)"""
    nll, _ = lm_token_nll(model, model_inputs(batch), shifted(batch["labels"]), head,
                          chunk_size=chunk_size, fused_grads=fused_grads)
    return F.pad(nll[:, :-1], (1, 0))
