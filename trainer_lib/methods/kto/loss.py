"""The KTO loss (Ethayarajh et al. 2024, arXiv:2402.01306) as pure functions on tensors.

Per example, with r = log pi(y|x) - log pi_ref(y|x) and z the reference point (the clamped mean
log-ratio over mismatched prompt/completion pairs):

    desirable:    w_D * (1 - sigmoid(beta * (r - z)))
    undesirable:  w_U * (1 - sigmoid(beta * (z - r)))
"""

from __future__ import annotations

from typing import Optional

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


def document_logps(
    token_logps: torch.Tensor,
    document_index: torch.Tensor,
    num_documents: int,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document completion log-probabilities from token log-probs laid out in any rows.

    token_logps: [N] (or any shape) log-prob of each completion token; document_index: the same
    shape, which document each token belongs to (0 .. num_documents - 1). Packed rows, padded rows
    or a flat list of selected tokens all reduce the same way. Returns (log-probs [D], completion
    token counts [D]); summed over each document's tokens, or averaged when `average`. A document
    with no completion token gives 0.
    """
    flat, index = token_logps.reshape(-1), document_index.reshape(-1)
    summed = flat.new_zeros(num_documents).index_add(0, index, flat)
    counts = torch.zeros(num_documents, dtype=torch.long, device=flat.device).index_add(
        0, index, torch.ones_like(index))
    if average:
        summed = summed / counts.clamp(min=1).to(summed.dtype)
    return summed, counts


def reference_point(
    kl_logratio_sum: torch.Tensor | float, kl_count: torch.Tensor | float
) -> torch.Tensor:
    """z = max(0, mean of log pi - log pi_ref over the mismatched pairs), from their sum and
    count (summed over micro-batches and processes first: a share with no pairs adds 0 to both)."""
    s = torch.as_tensor(kl_logratio_sum, dtype=torch.float64)
    c = torch.as_tensor(kl_count, dtype=torch.float64)
    return (s / c.clamp(min=1)).clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    loss_type: str = "kto",
    z: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses.

    Args:
        policy_logps, ref_logps: [B] completion log-probs of the real (prompt, completion) pairs.
        is_desirable: [B] bool.
        z: the reference point (`reference_point` over the mismatched pairs of the whole
            optimiser step); needed by loss_type "kto", unused by "apo_zero_unpaired".

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
        if z is None:
            raise ValueError("loss_type='kto' needs the reference point z, estimated from the "
                             "mismatched pairs (reference_point); see mismatched_pairing")
        z = torch.as_tensor(z).detach().to(device=logratio.device, dtype=dtype).clamp(min=0)
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


def kto_sft_losses(
    completion_logp_sums: torch.Tensor,
    completion_tokens: torch.Tensor,
    is_desirable: torch.Tensor,
    *,
    sft_weight: float,
) -> torch.Tensor:
    """Per-example SFT term [B]: `sft_weight` times the mean per-token NLL of each desirable
    completion (its summed log-prob over its token count), 0 for undesirable ones.

    The trainer sums these over a step and scales the sum by `sft_scale` (examples / desirable
    examples of the step), so that after the loop's division by the example count the step
    objective is mean_i kto_i + sft_weight * mean_{i desirable} mean_t(-log p(y_i,t)): the
    term's weight does not change with the share of desirable examples.
    """
    nll = -completion_logp_sums / completion_tokens.clamp(min=1).to(completion_logp_sums.dtype)
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


def sft_scale(num_examples, num_desirable):
    """What the summed `kto_sft_losses` are multiplied by so that, divided by `num_examples` (the
    loop's normalisation), they give their mean over the `num_desirable` desirable examples.
    Numbers or tensors (a step's totals, on the device: worked out there, unread)."""
    if torch.is_tensor(num_desirable):
        return torch.where(num_desirable > 0, num_examples / num_desirable.clamp(min=1), 0.0)
    return num_examples / num_desirable if num_desirable > 0 else 0.0
