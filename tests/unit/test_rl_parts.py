"""Pure pieces of the RL stage: reward functions as TRL calls them, rollout -> TRL output and its
document mask, the collapse guard, run names, ablation configs."""

from __future__ import annotations

import pytest

from searchrl.agent.engine import run_rollouts
from searchrl.agent.fakes import KeywordRetriever, ScriptedBackend
from searchrl.agent.protocols import get_protocol
from searchrl.config import RewardCfg, validate
from searchrl.training import rl as RL
from searchrl.training import rl_steps as steps


def _call(funcs, **kw):
    return {f.__name__: f(prompts=[""] * len(kw["answers"]), completions=[""] * len(kw["answers"]),
                          completion_ids=[[]] * len(kw["answers"]), **kw) for f in funcs}


def test_pp_reward_functions_per_component_and_per_group():
    kw = {"rollout_answer": ["Lima", "Lima", None, "Cusco", "Paris", "Paris"],
          "answers": [["Lima"]] * 4 + [["Paris"]] * 2,
          "retrievals": [2, 0, 1, 1, 1, 1],
          "format_errors": [[], [], ["answer missing"], [], [], []]}
    out = _call(steps.reward_functions(RewardCfg(), group_size=4), **kw)
    assert out["format"] == [0, 0, -2, 0, 0, 0]
    assert out["answer"] == [1, 1, 0, 0, 1, 1]
    # group 1 (rows 0-3): correct counts {2, 0}, variance 1 -> 2 to the rollout with 0 retrievals;
    # group 2 (rows 4-5): counts {1, 1}, sigma 0 -> nothing
    assert out["group"] == [0, 2.0, 0, 0, 0, 0]
    names = [f.__name__ for f in steps.reward_functions(RewardCfg(group_reward=False), 4)]
    assert names == ["format", "answer"]


def test_r1searcher_reward_functions():
    kw = {"rollout_answer": ["Lima city", None], "answers": [["Lima"], ["Lima"]], "retrievals": [1, 0],
          "format_errors": [[], ["think tags"]]}
    s1 = _call(steps.reward_functions(RewardCfg(kind="r1searcher_stage1"), 2), **kw)
    assert s1 == {"retrieval": [0.5, 0.0], "format": [0.5, 0.0]}
    s2 = _call(steps.reward_functions(RewardCfg(kind="r1searcher_stage2"), 2), **kw)
    assert s2["f1"] == pytest.approx([2 / 3, 0.0]) and s2["format"] == [0.0, -2.0]


def test_rollouts_reach_trl_with_documents_masked(smollm2_tokenizer):
    tok = smollm2_tokenizer
    pp = get_protocol("r1searcher_pp")
    q = "In which country was Talo Vesk born?"
    backend = ScriptedBackend(tok, {q: ["<external>Talo Vesk birthplace</external>",
                                        "<internal>So he was born in Peru.</internal><answer>Peru</answer>"]},
                              query_close="</external>")
    retriever = KeywordRetriever([("p1", "Talo Vesk", "Talo Vesk was born in Peru.")])
    trajs = run_rollouts(backend, retriever, pp, [("q1", q)], n=2)
    out = steps.rollout_output(trajs, pp)
    for ids, mask, t in zip(out["completion_ids"], out["env_mask"], trajs, strict=True):
        env = [i for i, m in zip(ids, mask, strict=True) if m == 0]
        assert tok.decode(env) == t.segments[1].text and "<document>" in t.segments[1].text
        assert len(out["logprobs"][0]) == len(ids)
    assert out["retrievals"] == [1, 1] and out["rollout_answer"] == ["Peru", "Peru"]
    assert out["format_errors"] == [[], []] and out["internal_steps"] == [1, 1]
    steps.check_document_masking(pp, tok)
    steps.check_document_masking(get_protocol("r1searcher"), tok)


def test_collapse_guard_needs_both_format_and_reward_to_fall():
    guard = steps.CollapseGuard(window=2, format_drop=0.3, reward_drop=0.5)
    for step, (f, r) in enumerate([(0.9, 1.0), (0.9, 1.2), (0.8, 1.1)], 1):
        assert guard.update(step, f, r) is None
    assert guard.window_reward() == pytest.approx(1.15)
    assert guard.update(4, 0.8, 0.0) is None  # reward fell, format did not (window format 0.8 vs 0.9)
    msg = guard.update(5, 0.2, -1.0)  # window: format 0.5, reward -0.5 vs best window 0.9 / 1.15
    assert msg is not None and "format-valid rate fell to 0.50" in msg and "best window" in msg
    guard2 = steps.CollapseGuard(window=2, format_drop=0.3, reward_drop=0.5)
    for step, (f, r) in enumerate([(0.9, 1.0), (0.9, 1.0), (0.1, 0.9), (0.1, 0.9)], 1):
        assert guard2.update(step, f, r) is None  # format fell, reward did not


def test_run_names_follow_the_reward_configuration():
    p = validate({"rl_ablations": {"no_group_reward": {"reward": {"group_reward": False}},
                                   "r1": {"init": "policy", "protocol": "r1searcher", "memorization": False,
                                          "phases": [{"name": "s1", "reward": {"kind": "r1searcher_stage1"},
                                                      "max_steps": 1},
                                                     {"name": "s2", "reward": {"kind": "r1searcher_stage2"},
                                                      "max_steps": 1}]}}})
    main = RL.run_name(p.rl_config(None), None)
    assert main == "rl [pp+group(two_sigma_sq,population,eta=2) | mem=oracle,mu=0.1 | reinforce_pp_baseline]"
    no_group = RL.run_name(p.rl_config("no_group_reward"), "no_group_reward")
    assert no_group.startswith("rl_no_group_reward [pp-group |")
    assert "s1:r1s-stage1 > s2:r1s-stage2 | mem=off" in RL.run_name(p.rl_config("r1"), "r1")
    assert p.rl_config("r1").init == p.policy.model and p.rl_config("r1").out_dir == "models/rl_r1"
    assert RL.config_hash(p, p.rl_config(None)) != RL.config_hash(p, p.rl_config("no_group_reward"))


def test_evaluate_finds_each_trained_model_and_its_protocol():
    from tasks.evaluate import is_trained, trained_model

    p = validate({"rl_ablations": {"r1s": {"init": "policy", "protocol": "r1searcher", "memorization": False,
                                           "reward": {"kind": "r1searcher_stage2"}}},
                  "evaluate": {"methods": ["direct", "sft", "rl", "rl_r1s"]}})
    assert [is_trained(m) for m in p.evaluate.methods] == [False, True, True, True]
    assert trained_model(p, "sft") == ("models/sft", "r1searcher_pp")
    assert trained_model(p, "rl") == ("models/rl", "r1searcher_pp")
    assert trained_model(p, "rl_r1s") == ("models/rl_r1s", "r1searcher")


def test_memorization_metrics_use_the_facts_rl_trained_on(tmp_path):
    from searchrl.evaluation import Prediction
    from tasks.evaluate import memorization_metrics

    p = validate({"rl": {"metrics_dir": str(tmp_path)}, "evaluate": {"methods": ["direct", "sft", "rl"]}})
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "log.csv").write_text("step,questions\n1,t1 t2\n2,t3\n", encoding="utf-8")

    def pred(method, qid, seen_from, cem):
        return Prediction(qid, "kw_seen", f"{method}_closed_book", "q", "a", ["a"],
                          metadata={"seen_from": seen_from}, scores={"em": cem, "f1": cem, "cem": cem})

    # s1 and s3 ask facts of questions RL trained on (t1, t3); s2 does not
    preds = [pred("sft", "s1", ["t1"], 0.0), pred("sft", "s2", ["t9"], 1.0),
             pred("sft", "s3", ["t3", "t8"], 1.0), pred("rl", "s1", ["t1"], 1.0),
             pred("rl", "s2", ["t9"], 0.0), pred("rl", "s3", ["t3", "t8"], 1.0)]
    out = memorization_metrics(p, preds)
    assert out == {"rl": {"facts": 2, "trained_questions": 3, "before": "sft", "cem_before": 50.0,
                          "cem_after": 100.0, "f1_before": 50.0, "f1_after": 100.0}}


def test_group_reward_share_counts_groups_with_a_bonus():
    from searchrl.config import RewardCfg
    from searchrl.training.rl_steps import group_reward_share

    cfg = RewardCfg()
    # group 1: two correct with 1 and 2 retrievals -> the 1-retrieval one gets 2*sigma^2 = 0.5; group 2: one
    # correct only -> no bonus; group 3: two correct with equal counts -> sigma 0, no bonus
    correct = [True, True, False, False, True, False, True, True]
    retrievals = [1, 2, 0, 0, 3, 1, 2, 2]
    assert group_reward_share(correct, retrievals, 2, cfg) == 0.25
    assert group_reward_share(correct, retrievals, 2, cfg.model_copy(update={"group_reward": False})) == 0.0
