"""The KTO loss against values worked out by hand."""

import math

import pytest
import torch
from plain import completion_logps, kto_loss

from trainer_lib.methods.kto.loss import (
    auto_weights,
    class_balance,
    document_logps,
    kto_sft_losses,
    mismatched_pairing,
    reference_point,
    sft_scale,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


BETA = 0.1
# r = policy - ref = [1, -1, 1]; the mismatched pairs give policy - ref = [2, 0.5], so z = 1.25.
POLICY, REF = t(-10.0, -12.0, -8.0), t(-11.0, -11.0, -9.0)
KL_POLICY, KL_REF = t(-20.0, -21.0), t(-22.0, -21.5)
LABELS = torch.tensor([True, False, True])


def test_kto_loss_by_hand_with_both_weights():
    losses, z, rewards = kto_loss(
        POLICY, REF, KL_POLICY, KL_REF, LABELS,
        beta=BETA, desirable_weight=2.0, undesirable_weight=1.5,
    )
    z_hand = ((-20.0 + 22.0) + (-21.0 + 21.5)) / 2  # 1.25
    expected = [
        2.0 * (1 - sigmoid(0.1 * (1.0 - z_hand))),  # desirable, r = 1
        1.5 * (1 - sigmoid(0.1 * (z_hand - -1.0))),  # undesirable, r = -1
        2.0 * (1 - sigmoid(0.1 * (1.0 - z_hand))),
    ]
    assert z.item() == pytest.approx(1.25)
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.1, -0.1, 0.1], abs=1e-12)
    assert losses.shape == (3,) and z.shape == ()


def test_kto_gradient_by_hand():
    # d/dr [1 - sigmoid(beta (r - z))] = -beta * s * (1 - s), s = sigmoid(beta (r - z)); z has no gradient.
    policy = POLICY.clone().requires_grad_()
    kl_policy = KL_POLICY.clone().requires_grad_()
    losses, z, rewards = kto_loss(
        policy, REF, kl_policy, KL_REF, LABELS, beta=BETA, desirable_weight=1.0, undesirable_weight=1.0
    )
    losses.sum().backward()
    s = sigmoid(0.1 * (1.0 - 1.25))
    u = sigmoid(0.1 * (-1.0 - 1.25))  # undesirable: 1 - sigmoid(beta (z - r)) = sigmoid(beta (r - z))
    assert policy.grad.tolist() == pytest.approx([-0.1 * s * (1 - s), 0.1 * u * (1 - u), -0.1 * s * (1 - s)])
    assert kl_policy.grad is None
    assert not z.requires_grad and not rewards.requires_grad


def test_reference_point_is_clamped_at_zero():
    # The mismatched pairs are more likely under the reference: policy - ref = [-2, -1], mean -1.5 -> 0.
    losses, z, _ = kto_loss(
        POLICY, REF, t(-22.0, -21.0), t(-20.0, -20.0), LABELS,
        beta=BETA, desirable_weight=1.0, undesirable_weight=1.0,
    )
    assert z.item() == 0.0
    assert losses.tolist() == pytest.approx(
        [1 - sigmoid(0.1 * 1.0), 1 - sigmoid(0.1 * (0.0 + 1.0)), 1 - sigmoid(0.1 * 1.0)], abs=1e-12
    )


def test_reference_point_is_the_mean_over_every_process_pair_before_the_clamp():
    # Local pairs: log-ratios [2, 0.5] (sum 2.5, 2 pairs). Another process adds 6 pairs summing
    # to -9: z = (2.5 - 9) / 8 < 0, clamped to 0. A mean of the two means would give
    # (1.25 - 1.5) / 2, also < 0, so the second case tells them apart.
    seen = []

    def reduce_sum(x):
        seen.append(x.tolist())
        return x + torch.tensor([-9.0, 6.0], dtype=x.dtype)

    _, z, _ = kto_loss(POLICY, REF, KL_POLICY, KL_REF, LABELS, beta=BETA, desirable_weight=1.0,
                       undesirable_weight=1.0, reduce_sum=reduce_sum)
    assert seen == [pytest.approx([2.5, 2.0])]
    assert z.item() == 0.0
    # 6 pairs summing to 9.5: z = (2.5 + 9.5) / 8 = 1.5 (the mean of means would be ~1.42)
    _, z, _ = kto_loss(POLICY, REF, KL_POLICY, KL_REF, LABELS, beta=BETA, desirable_weight=1.0,
                       undesirable_weight=1.0,
                       reduce_sum=lambda x: x + torch.tensor([9.5, 6.0], dtype=x.dtype))
    assert z.item() == pytest.approx(1.5)


def test_a_process_without_pairs_adds_nothing_to_the_reference_point():
    # the stand-in of a process short of data reports (0, 0): z is the other process's mean
    assert reference_point(2.5 + 0.0, 2 + 0).item() == pytest.approx(1.25)
    assert reference_point(torch.tensor(-3.0), torch.tensor(2.0)).item() == 0.0
    assert reference_point(0.0, 0.0).item() == 0.0  # no pairs at all: no shift


def test_a_given_reference_point_replaces_the_local_estimate():
    losses, z, _ = kto_loss(POLICY, REF, None, None, LABELS, beta=BETA, desirable_weight=1.0,
                            undesirable_weight=1.0, z=torch.tensor(0.5, dtype=torch.float64))
    assert z.item() == 0.5
    assert losses.tolist() == pytest.approx(
        [1 - sigmoid(0.1 * 0.5), 1 - sigmoid(0.1 * 1.5), 1 - sigmoid(0.1 * 0.5)], abs=1e-12)


def test_apo_zero_unpaired_by_hand():
    losses, z, rewards = kto_loss(
        POLICY, REF, None, None, LABELS,
        beta=BETA, desirable_weight=2.0, undesirable_weight=1.5, loss_type="apo_zero_unpaired",
    )
    assert z.item() == 0.0
    assert losses.tolist() == pytest.approx(
        [2.0 * (1 - sigmoid(0.1)), 1.5 * sigmoid(0.1 * -1.0), 2.0 * (1 - sigmoid(0.1))], abs=1e-12
    )
    assert rewards.tolist() == pytest.approx([0.1, -0.1, 0.1])


def test_apo_zero_unpaired_ignores_mismatched_pairs():
    with_kl, _, _ = kto_loss(POLICY, REF, KL_POLICY, KL_REF, LABELS, beta=BETA, desirable_weight=1.0,
                             undesirable_weight=1.0, loss_type="apo_zero_unpaired")
    without, _, _ = kto_loss(POLICY, REF, None, None, LABELS, beta=BETA, desirable_weight=1.0,
                             undesirable_weight=1.0, loss_type="apo_zero_unpaired")
    assert torch.equal(with_kl, without)


def test_batch_of_only_desirable_examples():
    losses, z, _ = kto_loss(
        POLICY, REF, KL_POLICY, KL_REF, torch.tensor([True, True, True]),
        beta=0.5, desirable_weight=1.0, undesirable_weight=3.0,
    )
    # r = [1, -1, 1], z = 1.25
    assert losses.tolist() == pytest.approx(
        [1 - sigmoid(0.5 * -0.25), 1 - sigmoid(0.5 * -2.25), 1 - sigmoid(0.5 * -0.25)], abs=1e-12
    )
    assert z.item() == pytest.approx(1.25)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_policy_equal_to_reference(loss_type):
    logps = t(-5.0, -7.0, -3.0, -9.0)
    labels = torch.tensor([True, False, False, True])
    losses, z, rewards = kto_loss(
        logps, logps.clone(), t(-6.0, -4.0, -8.0, -2.0), t(-6.0, -4.0, -8.0, -2.0), labels,
        beta=0.3, desirable_weight=1.2, undesirable_weight=0.8, loss_type=loss_type,
    )
    assert z.item() == 0.0
    assert rewards.tolist() == [0.0] * 4
    assert losses.tolist() == pytest.approx([0.6, 0.4, 0.4, 0.6])


def test_averaged_log_probs_by_hand():
    token_logps = t(-1.0, -2.0, -3.0, -0.5, -0.5, -7.0).reshape(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert completion_logps(token_logps, mask).tolist() == pytest.approx([-3.0, -8.0])
    assert completion_logps(token_logps, mask, average=True).tolist() == pytest.approx([-1.5, -8.0 / 3])
    # A row without completion tokens gives 0 rather than NaN.
    empty = completion_logps(token_logps, torch.zeros(2, 3, dtype=torch.bool), average=True)
    assert empty.tolist() == [0.0, 0.0]

    # The loss on averaged log-probs: policy [-1.5, -8/3] vs ref [-2.0, -3.0] -> r = [0.5, 1/3].
    ref_token_logps = t(-2.0, -2.0, -1.0, -3.0, -3.0, -3.0).reshape(2, 3)
    losses, _, rewards = kto_loss(
        completion_logps(token_logps, mask, average=True),
        completion_logps(ref_token_logps, mask, average=True),
        t(-1.0, -1.0), t(-1.0, -1.0), torch.tensor([True, False]),
        beta=1.0, desirable_weight=1.0, undesirable_weight=1.0,
    )
    assert rewards.tolist() == pytest.approx([0.5, 1 / 3])
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.5), 1 - sigmoid(-1 / 3)])


def test_document_logps_sum_or_average_each_documents_tokens():
    # tokens of 3 documents in any order, as packed rows give them
    token_logps = t(-1.0, -2.0, -0.5, -3.0, -0.25, -4.0)
    index = torch.tensor([0, 0, 2, 0, 2, 1])
    sums, counts = document_logps(token_logps, index, 4)
    assert sums.tolist() == [-6.0, -4.0, -0.75, 0.0] and counts.tolist() == [3, 1, 2, 0]
    means, _ = document_logps(token_logps, index, 4, average=True)
    assert means.tolist() == [-2.0, -4.0, -0.375, 0.0]


def test_per_example_sft_losses_are_each_desirable_completions_mean_token_nll():
    # row 0: log-probs summing to -3 over 2 tokens; row 1 undesirable; row 2: -2 over 2 tokens
    losses = kto_sft_losses(t(-3.0, -1.0, -2.0), torch.tensor([2, 2, 2]),
                            torch.tensor([True, False, True]), sft_weight=0.3)
    assert losses.tolist() == pytest.approx([0.3 * 1.5, 0.0, 0.3 * 1.0])


def test_the_sft_term_is_a_mean_over_desirable_examples():
    # summed over a step of 8 examples, 2 of them desirable, then divided by the 8: the mean over
    # the 2, whatever the share of desirable examples
    per_example = t(0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert (per_example.sum() * sft_scale(8, 2) / 8).item() == pytest.approx(0.8)
    assert sft_scale(8, 0) == 0.0


def test_loss_rejects_unusable_arguments():
    with pytest.raises(ValueError, match="auto_weights"):
        kto_loss(POLICY, REF, KL_POLICY, KL_REF, LABELS, beta=BETA, desirable_weight="auto", undesirable_weight=1.0)
    with pytest.raises(TypeError, match="bool"):
        kto_loss(POLICY, REF, KL_POLICY, KL_REF, LABELS.float(), beta=BETA, desirable_weight=1.0,
                 undesirable_weight=1.0)
    with pytest.raises(ValueError, match="needs the reference point z"):
        kto_loss(POLICY, REF, None, None, LABELS, beta=BETA, desirable_weight=1.0, undesirable_weight=1.0)
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(POLICY, REF, KL_POLICY, KL_REF, LABELS, beta=BETA, desirable_weight=1.0,
                 undesirable_weight=1.0, loss_type="sigmoid")


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_mismatched_pairing_is_a_derangement(n):
    p = mismatched_pairing(n)
    assert sorted(p) == list(range(n))  # every completion used exactly once
    assert all(p[i] != i for i in range(n))  # none with its own prompt


@pytest.mark.parametrize("n", [0, 1])
def test_mismatched_pairing_needs_two_examples(n):
    with pytest.raises(ValueError, match="batch size of at least 2"):
        mismatched_pairing(n)


def _ratio(n_d, n_u, w_d, w_u):
    return w_d * n_d / (w_u * n_u)


@pytest.mark.parametrize("n_d,n_u", [(100, 300), (200, 100), (1, 50), (150, 100)])
def test_class_balance_warns_outside_range_and_suggestion_lands_inside(n_d, n_u):
    ok, message, (w_d, w_u) = class_balance(n_d, n_u, 1.0, 1.0)
    assert not ok
    assert "[1, 4/3]" in message and "desirable_weight=" in message
    assert 1.0 <= _ratio(n_d, n_u, w_d, w_u) <= 4 / 3
    assert class_balance(n_d, n_u, w_d, w_u)[0]


def test_class_balance_suggestion_keeps_undesirable_weight():
    ok, _, (w_d, w_u) = class_balance(100, 300, 1.0, 2.0)
    assert not ok and w_u == 2.0
    assert w_d == pytest.approx(7 / 6 * 2.0 * 300 / 100)


@pytest.mark.parametrize("n_d,n_u,w_d,w_u", [(150, 150, 1.0, 1.0), (4, 3, 1.0, 1.0), (120, 100, 1.0, 1.0),
                                             (100, 300, 3.5, 1.0)])
def test_class_balance_accepts_ratios_within_range(n_d, n_u, w_d, w_u):
    ok, _, suggested = class_balance(n_d, n_u, w_d, w_u)
    assert ok and suggested == (w_d, w_u)


def test_auto_weights():
    assert auto_weights(150, 150) == (1.0, 1.0)  # already balanced: unchanged
    w_d, w_u = auto_weights(10, 90)
    assert (w_d, w_u) == (pytest.approx(7 / 6 * 9), 1.0)
    w_d, w_u = auto_weights(300, 100)
    assert 1.0 <= _ratio(300, 100, w_d, w_u) <= 4 / 3


@pytest.mark.parametrize("n_d,n_u,which", [(0, 10, "no desirable examples"), (10, 0, "no undesirable examples")])
def test_one_class_missing_is_an_error(n_d, n_u, which):
    with pytest.raises(ValueError, match=f"{which}: KTO needs both"):
        class_balance(n_d, n_u, 1.0, 1.0)
    with pytest.raises(ValueError, match=which):
        auto_weights(n_d, n_u)
