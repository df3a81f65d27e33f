"""REINFORCE++-baseline advantages (METHOD.md B.6) against a batch worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from searchrl.training.advantages import (
    group_baseline,
    last_token_index,
    masked_whiten,
    reinforce_pp_baseline,
)


def _whiten(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


def test_hand_computed_batch_with_documents_padding_and_kl():
    # 2 questions x 2 rollouts, 4 tokens. Row 0 has a document token at position 2, row 1 a padding
    # token at position 3, row 2 a two-token document block; mask = policy tokens.
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])  # group means 0.5 and 2 -> [0.5, -0.5, 0, 0]
    old = torch.zeros(4, 4)
    ref = torch.full((4, 4), -0.5)  # k1 KL = 0.5 per policy token; beta 0.1 -> -0.05 per token
    adv, kl = reinforce_pp_baseline(rewards, mask, group_size=2, old_logps=old, ref_logps=ref, beta=0.1)
    # token rewards: -0.05 on each policy token, + r on the last policy token; returns = suffix sums
    returns = [[0.35, 0.40, 0.0, 0.45],   # row 0: -.05 -.05 [doc] (-.05 + .5)
               [-0.65, -0.60, -0.55, 0.0],  # row 1: -.05 -.05 (-.05 - .5) [pad]
               [-0.10, 0.0, 0.0, -0.05],  # row 2: -.05 [doc doc] -.05 (+0)
               [-0.20, -0.15, -0.10, -0.05]]  # row 3
    flat = [v for row, mrow in zip(returns, mask.tolist(), strict=True)
            for v, m in zip(row, mrow, strict=True) if m]
    expected_flat = iter(_whiten(flat))
    expected = [[next(expected_flat) if m else 0.0 for m in mrow] for mrow in mask.tolist()]
    assert adv.flatten().tolist() == pytest.approx([v for row in expected for v in row], abs=1e-5)
    assert kl == pytest.approx(0.5)
    assert adv[mask == 0].abs().max().item() == 0.0  # no advantage on documents or padding


def test_no_kl_and_no_signal_gives_zero_advantages():
    mask = torch.ones(4, 3)
    adv, kl = reinforce_pp_baseline(torch.tensor([1.0, 1.0, -2.0, -2.0]), mask, group_size=2)
    assert adv.abs().max().item() == 0.0
    assert kl == 0.0


def test_group_baseline_then_clamp_to_ten():
    mask = torch.ones(4, 1)
    adv, _ = reinforce_pp_baseline(torch.tensor([60.0, 0.0, 1.0, -1.0]), mask, group_size=2)
    # baseline: [30, -30, 1, -1] -> clamp: [10, -10, 1, -1] -> whiten (std sqrt(50.5))
    assert adv[:, 0].tolist() == pytest.approx(_whiten([10.0, -10.0, 1.0, -1.0]), abs=1e-6)
    no_clamp, _ = reinforce_pp_baseline(torch.tensor([60.0, 0.0, 1.0, -1.0]), mask, group_size=2, clip=100.0)
    assert no_clamp[:, 0].tolist() == pytest.approx(_whiten([30.0, -30.0, 1.0, -1.0]), abs=1e-6)


def test_helpers():
    assert group_baseline(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2).tolist() == [-1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="multiple"):
        group_baseline(torch.tensor([1.0, 2.0, 3.0]), 2)
    assert last_token_index(torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])).tolist() == [1, 2, 0]
    w = masked_whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]))
    assert w[0].tolist() == pytest.approx([-1.0, 1.0, 0.0])


def test_beta_needs_logprobs():
    with pytest.raises(ValueError, match="old_logps"):
        reinforce_pp_baseline(torch.zeros(2), torch.ones(2, 2), 2, beta=0.1)
