"""DPO loss variants against hand-computed values (SPR Eq. 4 and TRL's definitions)."""

import math

import pytest
import torch

from spr_lightning.losses import DPO_LOSSES, chosen_nll, dpo_loss

# Δ = (π_c − ref_c) − (π_r − ref_r) = (−1 − (−3)) − (−5 − (−4)) = 2 − (−1) = 3
PC, PR, RC, RR = torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_equals_ln2_and_zero_rewards_when_policy_is_reference():
    logps = torch.tensor([-12.5, -3.0, -40.0])
    losses, chosen_r, rejected_r = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(chosen_r, torch.zeros(3)) and torch.equal(rejected_r, torch.zeros(3))


def test_sigmoid_hand_computed():
    losses, chosen_r, rejected_r = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(-log_sigmoid(0.3), rel=1e-6)
    assert chosen_r.item() == pytest.approx(0.2) and rejected_r.item() == pytest.approx(-0.1)


def test_sigmoid_label_smoothing_is_conservative_dpo():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    expected = -0.8 * log_sigmoid(0.3) - 0.2 * log_sigmoid(-0.3)
    assert losses.item() == pytest.approx(expected, rel=1e-6)


def test_robust_hand_computed_and_range_checked():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust", label_smoothing=0.2)
    expected = (-0.8 * log_sigmoid(0.3) + 0.2 * log_sigmoid(-0.3)) / 0.6
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)


def test_hinge_hand_computed():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    assert losses.item() == pytest.approx(1 - 0.3)
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")
    assert losses.item() == 0.0


def test_ipo_uses_length_averaged_logratios():
    # chosen log-ratio 2 over 4 tokens, rejected −1 over 2 tokens: (0.5 − (−0.5) − 1/(2·0.1))² = (1 − 5)² = 16
    losses, _, _ = dpo_loss(
        PC, PR, RC, RR, beta=0.1, loss_type="ipo",
        chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]),
    )
    assert losses.item() == pytest.approx(16.0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo")


def test_unknown_loss_type_names_the_choices():
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_fp32_output_detached_rewards_and_gradient_sign(loss_type):
    pc = torch.tensor([-2.0, -3.0], dtype=torch.bfloat16, requires_grad=True)
    losses, chosen_r, _ = dpo_loss(
        pc, torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0]),
        loss_type=loss_type, chosen_lengths=torch.tensor([3, 3]), rejected_lengths=torch.tensor([3, 3]),
    )
    assert losses.dtype == torch.float32 and not chosen_r.requires_grad
    losses.sum().backward()
    # Raising the chosen log-prob lowers every loss variant at Δ = 0.
    assert (pc.grad < 0).all()


def test_chosen_nll_is_per_token_over_the_batch_not_per_sample():
    # -6 nats over 3 tokens and -3 nats over 1 token: 9 / 4 per token (TRL's nll_loss); per sample it would be 2.5.
    logps, lengths = torch.tensor([-6.0, -3.0]), torch.tensor([3, 1])
    assert chosen_nll(logps, lengths).item() == pytest.approx(9.0 / 4.0)
    assert chosen_nll(logps, lengths).item() != pytest.approx((2.0 + 3.0) / 2)
    assert chosen_nll(torch.zeros(1), torch.zeros(1, dtype=torch.long)).item() == 0.0
