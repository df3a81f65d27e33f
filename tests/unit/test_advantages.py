"""REINFORCE++-baseline advantages (METHOD.md B.6) against a batch worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from searchrl.training.advantages import (
    flat_groups,
    group_baseline,
    group_normalized,
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


# ----------------------------------------------------------------------------- no variance -> no signal
def test_issue_case_constant_groups_at_step_one_give_exactly_zero():
    # 2 questions x 8 rollouts; group rewards all 2/3, then all 0.4 (a stage-2 F1 reward); KL exactly 0.
    # The old float32 group mean left ~1e-8 residues that whitening turned into advantages of +-1.
    rewards = torch.tensor([2 / 3] * 8 + [0.4] * 8, dtype=torch.float32)
    mask = torch.ones(16, 5)
    logps = torch.randn(16, 5)
    adv, kl = reinforce_pp_baseline(rewards, mask, 8, logps, logps.clone(), beta=1e-4)
    assert kl == 0.0
    assert adv.abs().max().item() == 0.0
    assert group_normalized(rewards, 8).abs().max().item() == 0.0


REWARD_VALUES = [2 / 3, 0.4, 1 / 3, 0.1 + 0.2, 0.3, -2.0, -2.0 + 2 / 3, 1.0, 0.0, 0.7, 1.0 + 2.0]


@settings(max_examples=300, deadline=None)
@given(group_size=st.integers(1, 16), n_groups=st.integers(1, 64),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       values=st.lists(st.sampled_from(REWARD_VALUES), min_size=64, max_size=64),
       width=st.integers(1, 9), data=st.data())
def test_no_variance_maps_to_exactly_no_signal(group_size, n_groups, dtype, values, width, data):
    # every group constant (each its own value, as the dtype rounds it), random masks and lengths
    rewards = torch.tensor([values[g] for g in range(n_groups) for _ in range(group_size)], dtype=dtype)
    mask = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=width, max_size=width),
                                           min_size=n_groups * group_size, max_size=n_groups * group_size)))
    logps = torch.randn(mask.shape)
    assert flat_groups(rewards, group_size).all()
    assert group_baseline(rewards, group_size).abs().max().item() == 0.0
    assert group_normalized(rewards, group_size).abs().max().item() == 0.0
    adv, kl = reinforce_pp_baseline(rewards, mask, group_size, logps, logps.clone(), beta=1e-4)
    assert kl == 0.0 and adv.abs().max().item() == 0.0


@settings(max_examples=200, deadline=None)
@given(group_size=st.integers(2, 16), n_groups=st.integers(2, 64),
       flat=st.lists(st.booleans(), min_size=64, max_size=64),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       data=st.data())
def test_flat_groups_get_zero_and_the_others_keep_their_signal(group_size, n_groups, flat, dtype, data):
    rows = []
    for g in range(n_groups):
        if flat[g]:
            rows += [data.draw(st.sampled_from(REWARD_VALUES))] * group_size
        else:  # at least two distinct values, 0.25 apart or more
            base = data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -2.0]), min_size=group_size,
                                      max_size=group_size).filter(lambda v: len(set(v)) > 1))
            rows += base
    rewards = torch.tensor(rows, dtype=dtype)
    is_flat = flat_groups(rewards, group_size)
    assert is_flat.tolist() == flat[:n_groups]
    centred = group_baseline(rewards, group_size).view(n_groups, group_size)
    normed = group_normalized(rewards, group_size).view(n_groups, group_size)
    assert centred[is_flat].abs().max().item() == 0.0 if is_flat.any() else True
    assert normed[is_flat].abs().max().item() == 0.0 if is_flat.any() else True
    if (~is_flat).any():
        assert centred[~is_flat].abs().amax(dim=1).min().item() >= 0.1
        # sums to zero within each group (exactly what the group mean subtracts)
        assert centred.sum(dim=1).abs().max().item() < 1e-9


def test_grpo_normalisation_matches_trl_formula_when_there_is_variance():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, -2.0, 0.5, 0.5, 0.5])
    g = rewards.view(2, 4)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).flatten()
    assert group_normalized(rewards, 4).tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_whitening_of_pure_float_noise_is_zero_but_real_signal_survives():
    mask = torch.ones(4, 3)
    noise = torch.tensor([[1e-9, -1e-9, 0.0], [2e-9, 0.0, 0.0], [0.0, -3e-9, 0.0], [0.0, 0.0, 1e-9]])
    assert masked_whiten(noise, mask).abs().max().item() == 0.0
    small_but_real = noise * 1e5  # 1e-4: a KL penalty of beta=1e-4 is this small
    assert masked_whiten(small_but_real, mask).abs().max().item() > 0.5
