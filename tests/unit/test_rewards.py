"""Rewards against hand-computed cases (METHOD.md A.5, B.4)."""

from __future__ import annotations

import pytest

from searchrl import rewards as R


# ----------------------------------------------------------------------------- R1-Searcher++
def test_format_reward_zero_or_penalty():
    assert R.format_reward([]) == 0.0
    assert R.format_reward(["answer missing"]) == -2.0
    assert R.format_reward(["x", "y"], penalty=-1.0) == -1.0


@pytest.mark.parametrize(("answer", "golds", "expected"), [
    ("Paris", ["Paris"], 1.0),
    ("the city of Paris.", ["paris"], 1.0),  # CEM: every gold token covered, normalised
    ("Paris France", ["Paris", "Lyon"], 1.0),  # any gold
    ("Lyon", ["Paris"], 0.0),
    ("it is one of Paris London Rome Berlin Madrid Lisbon or Vienna", ["Paris"], 0.0),  # 12 words > 10
    ("a b c d e f g h i Paris", ["Paris"], 1.0),  # exactly 10 words
    (None, ["Paris"], 0.0),  # no answer (malformed output)
    ("   ", ["Paris"], 0.0),
])
def test_answer_reward_is_cem_with_ten_word_cap(answer, golds, expected):
    assert R.answer_reward(answer, golds) == expected


def test_group_reward_goes_to_the_fewest_retrievals_among_correct():
    # correct counts {0, 1, 2}: mean 1, population variance 2/3, 2 sigma^2 = 4/3 -> only t = 0
    out = R.group_rewards([True, True, True, False], [0, 1, 2, 0])
    assert out == pytest.approx([4 / 3, 0.0, 0.0, 0.0])


def test_group_reward_ties_at_the_minimum_all_get_it_and_eta_clips():
    # counts {1, 1, 3, 3}: variance 1, 2 sigma^2 = 2 (= eta); both rollouts with t = 1 get it
    assert R.group_rewards([True] * 4, [1, 1, 3, 3]) == pytest.approx([2.0, 2.0, 0.0, 0.0])
    # counts {0, 4}: variance 4, 2 sigma^2 = 8 -> clipped to eta = 2
    assert R.group_rewards([True, True], [0, 4]) == pytest.approx([2.0, 0.0])
    assert R.group_rewards([True, True], [0, 4], clip=10.0) == pytest.approx([8.0, 0.0])


def test_group_reward_sigma_zero_and_no_correct_rollout_give_nothing():
    assert R.group_rewards([True, True, False, False], [1, 1, 0, 2]) == [0.0] * 4  # sigma = 0
    assert R.group_rewards([False] * 4, [0, 1, 2, 3]) == [0.0] * 4  # nobody correct
    assert R.group_rewards([True, False], [3, 0]) == [0.0, 0.0]  # one correct rollout: sigma = 0


def test_group_reward_ignores_incorrect_rollouts_with_fewer_retrievals():
    # the incorrect rollout searched least; among the correct ones {1, 3}: variance 1 -> 2 to index 1
    assert R.group_rewards([False, True, True], [0, 1, 3]) == pytest.approx([0.0, 2.0, 0.0])


def test_group_reward_forms_and_std():
    # counts {0, 2}: population variance 1, sample variance 2
    assert R.group_rewards([True, True], [0, 2], form="sigma") == pytest.approx([1.0, 0.0])
    assert R.group_rewards([True, True], [0, 2], form="range") == pytest.approx([2.0, 0.0])
    assert R.group_rewards([True, True], [0, 2], std="sample", clip=10) == pytest.approx([4.0, 0.0])
    assert R.group_rewards([True, True], [0, 2], std="population", clip=10) == pytest.approx([2.0, 0.0])
    with pytest.raises(ValueError, match="form"):
        R.group_rewards([True, True], [0, 2], form="cubic")
    with pytest.raises(ValueError, match="retrieval counts"):
        R.group_rewards([True], [0, 1])


# ----------------------------------------------------------------------------- R1-Searcher
def test_stage1_rewards():
    assert R.retrieval_reward(0) == 0.0
    assert R.retrieval_reward(3) == 0.5
    assert R.stage1_format_reward([]) == 0.5
    assert R.stage1_format_reward(["think tags"]) == 0.0  # malformed: no penalty in stage 1


def test_stage2_f1_reward():
    assert R.f1_reward("Paris", ["Paris"]) == 1.0
    assert R.f1_reward("Paris France", ["Paris"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert R.f1_reward("no", ["yes"]) == 0.0
    assert R.f1_reward(None, ["Paris"]) == 0.0  # malformed output: no answer
