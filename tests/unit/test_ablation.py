"""bench/ablation.py's pieces: the claim verdicts, and the preset it runs defines exactly its arms."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_bench", ROOT / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("lo", "hi", "direction", "want"), [
    (-0.4, -0.1, "<", "holds"), (-0.4, 0.1, "<", "not shown"), (0.1, 0.4, "<", "contradicted"),
    (0.1, 0.4, ">", "holds"), (-0.1, 0.4, ">", "not shown"), (-0.4, -0.1, ">", "contradicted"),
    (-0.4, 0.0, "<", "not shown"), (None, None, "<", "not tested")])
def test_verdict_needs_the_whole_interval_on_one_side(ablation, lo, hi, direction, want):
    assert ablation.verdict({"lo": lo, "hi": hi}, direction) == want


def test_the_preset_defines_the_studys_arms_from_one_cold_start(ablation):
    from searchrl.config import load_params

    p = load_params(ROOT / "params.yaml", preset=ROOT / "configs" / "ablation.yaml")
    assert {"rl", *(f"rl_{name}" for name in p.rl_ablations)} == set(ablation.ARMS)
    assert set(p.evaluate.methods) == {*ablation.BASELINES, *ablation.ARMS}
    vanilla = p.rl_config("vanilla")
    assert not vanilla.memorization and not vanilla.reward.group_reward
    # evaluation inserts as many passages per query as training, so two retrievals fit the budget
    assert p.evaluate.top_k == p.agent.top_k
