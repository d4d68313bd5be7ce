"""The KTO loss (Ethayarajh et al. 2024, arXiv:2402.01306) as pure functions on tensors.

Per example, with r = log pi(y|x) - log pi_ref(y|x):

    desirable:    w_D * (1 - sigmoid(beta * (r - z)))
    undesirable:  w_U * (1 - sigmoid(beta * (z - r)))

z is the reference point: the batch estimate of KL(pi || pi_ref), taken from prompts paired with
another example's completion (`mismatched_pairing`), detached, averaged across processes and
clamped at 0.

The trainer's step, in order (trainer_lib/trainers/kto.py):
  1. `completion_logps` on the real pairs and on the mismatched pairs (the same `average` for both,
     so r and z are on one scale), for the policy and the reference model;
  2. `kto_loss` -> per-example losses, z, rewards; the trainer returns their SUM, and the shared
     loop divides by the number of examples of the whole optimiser step;
  3. when `sft_weight > 0`, adds the per-example `kto_sft_losses(...)` to that sum
     (`kto_sft_term` is the per-micro-batch form, for callers that average per micro-batch).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

LOSS_TYPES = ("kto", "apo_zero_unpaired")

# The paper's rule of thumb (section 4.2): keep w_D * n_D / (w_U * n_U) within [1, 4/3].
BALANCE_LOW, BALANCE_HIGH = 1.0, 4.0 / 3.0
# What `auto_weights` and the suggestions aim for: the middle of that range, so rounding never
# lands a suggestion on the wrong side of a bound.
BALANCE_TARGET = (BALANCE_LOW + BALANCE_HIGH) / 2  # 7/6
_EPS = 1e-9


def mismatched_pairing(n: int) -> list[int]:
    """Which completion each prompt is paired with for the KL estimate: prompt i gets completion p[i].

    Rotation by one, i -> (i + 1) % n: a derangement for every n >= 2, so every completion is used
    exactly once and none with its own prompt, odd n included (reversing the batch would leave the
    middle example of an odd batch with its own completion).
    """
    if n < 2:
        raise ValueError(
            f"the KL reference point needs a batch size of at least 2 (got {n}): each prompt is "
            "paired with another example's completion; raise train.batch_size, or use "
            "loss_type='apo_zero_unpaired', which has no KL term"
        )
    return [(i + 1) % n for i in range(n)]


def completion_logps(
    token_logps: torch.Tensor, completion_mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Per-sequence log-probability of the completion: [B, T] token log-probs -> [B].

    Summed over completion tokens, or averaged over them when `average` (KTOConfig.average_log_probs).
    A row with no completion token gives 0 either way.
    """
    mask = completion_mask.bool()
    summed = token_logps.masked_fill(~mask, 0.0).sum(-1)
    if not average:
        return summed
    return summed / mask.sum(-1).clamp(min=1).to(summed.dtype)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_policy_logps: Optional[torch.Tensor],
    kl_ref_logps: Optional[torch.Tensor],
    is_desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    loss_type: str = "kto",
    reduce_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses.

    Args:
        policy_logps, ref_logps: [B] completion log-probs of the real (prompt, completion) pairs.
        kl_policy_logps, kl_ref_logps: [B'] log-probs of the mismatched pairs; ignored (may be
            None) for `apo_zero_unpaired`.
        is_desirable: [B] bool.
        reduce_mean: the cross-process mean of a 0-d tensor (e.g.
            `lambda t: accelerator.reduce(t, "mean")`); identity when None. z is clamped after it,
            so every process uses the same z.

    Returns:
        losses [B] (weights applied, batch order kept; the caller averages them),
        z [] (detached; 0 for `apo_zero_unpaired`),
        rewards [B] = beta * r, detached.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if isinstance(w, str) or not w > 0:
            raise ValueError(
                f"{name} must be a positive number, got {w!r}"
                + ("; resolve 'auto' with auto_weights(n_desirable, n_undesirable) first" if w == "auto" else "")
            )
    if is_desirable.dtype != torch.bool:
        raise TypeError(f"is_desirable must be a bool tensor, got {is_desirable.dtype}")
    if policy_logps.dim() != 1 or not policy_logps.shape == ref_logps.shape == is_desirable.shape:
        raise ValueError(
            "policy_logps, ref_logps and is_desirable must be 1-D of the same length, got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(is_desirable.shape)}"
        )

    # At least float32: bf16 log-ratios of long completions lose the small differences that matter.
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    logratio = policy_logps.to(dtype) - ref_logps.to(dtype)

    if loss_type == "kto":
        if kl_policy_logps is None or kl_ref_logps is None or kl_policy_logps.numel() == 0:
            raise ValueError(
                "loss_type='kto' needs the log-probs of the mismatched pairs (kl_policy_logps, "
                "kl_ref_logps); see mismatched_pairing"
            )
        z = (kl_policy_logps.detach().to(dtype) - kl_ref_logps.detach().to(dtype)).mean()
        if reduce_mean is not None:
            z = reduce_mean(z)
        z = z.clamp(min=0).detach()
        # 1 - sigmoid(x) is written as sigmoid(-x): the same value, without cancellation for large x.
        desirable = desirable_weight * torch.sigmoid(-beta * (logratio - z))
        undesirable = undesirable_weight * torch.sigmoid(-beta * (z - logratio))
    else:
        # TRL's apo_zero_unpaired (KTOTrainer.kto_loss, the unpaired variant of eq. 7 of APO,
        # arXiv:2408.06266): chosen_losses = 1 - F.sigmoid(beta * chosen_logratios),
        # rejected_losses = F.sigmoid(beta * rejected_logratios). No reference point.
        z = logratio.new_zeros(())
        desirable = desirable_weight * torch.sigmoid(-beta * logratio)
        undesirable = undesirable_weight * torch.sigmoid(beta * logratio)

    losses = torch.where(is_desirable, desirable, undesirable)
    rewards = (beta * logratio).detach()
    return losses, z, rewards


def kto_sft_term(
    token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    is_desirable: torch.Tensor,
    *,
    sft_weight: float,
) -> torch.Tensor:
    """`sft_weight` times the NLL of the desirable completions, to add to the mean KTO loss.

    Normalisation (as NeMo-Aligner's sft_loss_weight): the mean per-token NLL over all completion
    tokens of the desirable examples of the micro-batch, i.e. sum(-logp) / number of those tokens,
    so long completions weigh per token, not per sequence. 0 when the micro-batch has no
    desirable completion token.
    """
    mask = completion_mask.bool() & is_desirable.bool().unsqueeze(-1)
    n_tokens = mask.sum()
    if sft_weight == 0 or n_tokens == 0:
        return token_logps.new_zeros(())
    nll = -token_logps.masked_fill(~mask, 0.0).sum() / n_tokens
    return sft_weight * nll


def kto_sft_losses(
    token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    is_desirable: torch.Tensor,
    *,
    sft_weight: float,
) -> torch.Tensor:
    """Per-example SFT term [B]: `sft_weight` times the mean per-token NLL of each desirable
    completion, 0 for undesirable ones.

    Per example rather than per micro-batch (unlike `kto_sft_term`), so the term adds to the
    per-example KTO losses and the step mean over all examples of all micro-batches and processes
    does not depend on how the step was cut into micro-batches: the step objective is
    mean_i [kto_i + sft_weight * 1{desirable_i} * mean_t(-log p(y_i,t))].
    """
    mask = completion_mask.bool()
    n_tokens = mask.sum(-1).clamp(min=1).to(token_logps.dtype)
    nll = -token_logps.masked_fill(~mask, 0.0).sum(-1) / n_tokens
    return sft_weight * nll * is_desirable.to(nll.dtype)


def _check_counts(n_desirable: int, n_undesirable: int) -> None:
    # With one class absent w_D n_D / (w_U n_U) is 0 or undefined for every choice of weights, so
    # the paper's balance rule cannot be met; the reference point alone does not make up for it.
    for n, name, other in ((n_desirable, "desirable", "undesirable"), (n_undesirable, "undesirable", "desirable")):
        if n < 0:
            raise ValueError(f"the number of {name} examples cannot be negative, got {n}")
        if n == 0:
            raise ValueError(
                f"no {name} examples: KTO needs both desirable (label true) and undesirable "
                f"(label false) examples; the data has {n_desirable} desirable and "
                f"{n_undesirable} undesirable. Add {name} examples, or, for desirable-only data, "
                "use supervised fine-tuning"
            )


def auto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """Weights for desirable_weight="auto": (1, 1) when the data already meets the paper's rule,
    else w_U = 1 and w_D = (7/6) * n_U / n_D, the middle of the range [1, 4/3]."""
    _check_counts(n_desirable, n_undesirable)
    ratio = n_desirable / n_undesirable
    if BALANCE_LOW - _EPS <= ratio <= BALANCE_HIGH + _EPS:
        return 1.0, 1.0
    return BALANCE_TARGET / ratio, 1.0


def class_balance(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> tuple[bool, str, tuple[float, float]]:
    """Checks the paper's rule w_D * n_D / (w_U * n_U) in [1, 4/3].

    Returns (ok, message, suggested (w_D, w_U)). When not ok, the suggestion keeps
    undesirable_weight and sets desirable_weight so the ratio is 7/6; when ok it is the given weights.
    """
    _check_counts(n_desirable, n_undesirable)
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if BALANCE_LOW - _EPS <= ratio <= BALANCE_HIGH + _EPS:
        return True, (
            f"class balance ok: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) "
            f"= {desirable_weight:g} * {n_desirable} / ({undesirable_weight:g} * {n_undesirable}) "
            f"= {ratio:.3f}, within [1, 4/3]"
        ), (desirable_weight, undesirable_weight)
    suggested_d = BALANCE_TARGET * undesirable_weight * n_undesirable / n_desirable
    message = (
        f"KTO class balance: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = "
        f"{desirable_weight:g} * {n_desirable} / ({undesirable_weight:g} * {n_undesirable}) = "
        f"{ratio:.3f}, outside the range [1, 4/3] the KTO paper recommends; set "
        f"method.desirable_weight={suggested_d:.4g} (with undesirable_weight={undesirable_weight:g}), "
        'or desirable_weight="auto"'
    )
    return False, message, (suggested_d, undesirable_weight)
