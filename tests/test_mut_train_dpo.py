"""The DPO loss and rewards, number by number against the formula (several pairs, beta != 1)."""

from __future__ import annotations

import math

import pytest
import torch

from blip3.train.dpo import dpo_loss, sequence_logps


def test_dpo_loss_rewards_and_margin_by_hand():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-5.0, -2.0])
    rc, rr = torch.tensor([-3.0, -3.0]), torch.tensor([-3.0, -1.0])
    beta = 0.25
    out = dpo_loss(pc, pr, rc, rr, beta)
    # pair 1: chosen +2, rejected -2 -> z = 1; pair 2: chosen -1, rejected -1 -> z = 0
    expected = (-math.log(1 / (1 + math.exp(-1.0))) + math.log(2.0)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -0.25])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, -0.25])
    assert out.margin.item() == pytest.approx((1.0 + 0.0) / 2)


def test_dpo_rewards_carry_no_gradient_and_the_loss_does():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    out = dpo_loss(pc, pr, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending raises chosen, lowers rejected


def test_sequence_logps_shift_by_one():
    """The logit at t scores the label at t + 1: a peaked logit one step early is what counts."""
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # predicts token 2 at position 1
    labels = torch.tensor([[-100, 2, -100]])
    lp = sequence_logps(logits, labels).item()
    assert lp == pytest.approx(math.log(math.exp(10) / (math.exp(10) + 3)), abs=1e-5)
