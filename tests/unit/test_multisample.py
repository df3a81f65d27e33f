"""Multi-sample evaluation: bootstrap intervals over questions, paired comparisons, samples x seeds per
method, and the config that asks for them."""

from __future__ import annotations

import numpy as np
import pytest

from searchrl import evaluation
from searchrl.agent.fakes import KeywordRetriever, ScriptedBackend
from searchrl.agent.generation import Generation
from searchrl.config import AgentCfg, EvaluateCfg, load_params
from searchrl.data.schema import QARecord
from searchrl.intervals import bootstrap_mean, paired_difference, per_question_mean
from tests.conftest import PROJECT_ROOT


# ----------------------------------------------------------------------------- intervals
def test_bootstrap_mean_is_seeded_and_about_the_normal_width():
    rng = np.random.default_rng(1)
    x = 100.0 * (rng.random(400) < 0.5)
    mean, lo, hi = bootstrap_mean(x, resamples=2000, seed=0)
    assert mean == pytest.approx(x.mean())
    assert lo < mean < hi
    normal = 2 * 1.96 * x.std() / np.sqrt(len(x))  # the textbook width for a proportion
    assert hi - lo == pytest.approx(normal, rel=0.12)
    assert bootstrap_mean(x, 2000, seed=0) == (mean, lo, hi)  # reproducible
    assert bootstrap_mean(x, 2000, seed=1) != (mean, lo, hi)
    assert bootstrap_mean(x, resamples=0) == (mean, None, None)
    assert bootstrap_mean([], 100) == (0.0, None, None)


def test_paired_difference_cancels_the_shared_question_variance():
    rng = np.random.default_rng(0)
    hardness = rng.random(300) * 100  # questions differ a lot; method a is 5 points better on each
    a = {f"q{i}": h + 5 + rng.normal(0, 1) for i, h in enumerate(hardness)}
    b = {f"q{i}": h for i, h in enumerate(hardness)}
    b["only_b"] = 50.0  # a question only one method answered is left out
    d = paired_difference(a, b, resamples=1000, seed=0)
    assert d["n"] == 300 and d["diff"] == pytest.approx(5, abs=0.3)
    assert d["lo"] > 4 and d["hi"] < 6  # excludes 0 ...
    _, lo_a, hi_a = bootstrap_mean(list(a.values()), 1000, 0)
    assert hi_a - lo_a > 5 * (d["hi"] - d["lo"])  # ... while each method's own interval is wide


def test_per_question_mean_averages_samples_first():
    assert per_question_mean([("a", 1), ("a", 0), ("b", 1), ("a", 1)]) == {"a": pytest.approx(2 / 3), "b": 1.0}


# ----------------------------------------------------------------------------- summarize / compare
def pred(qid: str, method: str, em: float, sample: int = 0, retrievals: int = 0, lasj: float | None = None):
    scores = {"em": em, "f1": em, "cem": em} | ({"lasj": lasj} if lasj is not None else {})
    return evaluation.Prediction(qid, "ds", method, "q?", "p", ["g"], retrievals=retrievals, sample=sample,
                                 scores=scores)


def test_summarize_counts_questions_not_rows_and_reports_intervals():
    """q1 answered right once of 3 samples, q2 three of 3: the mean over questions is (1/3 + 1) / 2; the
    old row-wise summary reported n = 6 (rows) and no interval."""
    rows = [pred("q1", "m", e, s) for s, e in enumerate([1, 0, 0])] + [pred("q2", "m", 1, s) for s in range(3)]
    m = evaluation.summarize(rows, resamples=500, seed=0)["ds"]["m"]
    assert m["n"] == 2 and m["samples"] == 3
    assert m["em"] == pytest.approx(100 * (1 / 3 + 1) / 2, abs=1e-3)
    assert m["em_lo"] == pytest.approx(100 / 3, abs=1e-3) and m["em_hi"] == pytest.approx(100.0)
    assert "lasj" not in m and "lasj_unparseable" not in m  # not judged
    table = evaluation.markdown_table({"ds": {"m": m}})
    assert "66.7 [33.3, 100.0]" in table


def test_paired_comparisons_per_dataset_with_intervals():
    a = [pred(f"q{i}", "rl", 1.0, retrievals=1, lasj=1.0) for i in range(20)]
    b = [pred(f"q{i}", "direct", float(i % 2), retrievals=0, lasj=0.0) for i in range(20)]
    out = evaluation.paired_comparisons(a + b, [("rl", "direct"), ("rl", "absent")], resamples=200, seed=0)
    entry = out["ds"]["rl - direct"]
    assert list(out["ds"]) == ["rl - direct"]  # a pair with a method that has no rows is skipped
    assert entry["n"] == 20 and entry["em"] == pytest.approx(50.0) and entry["lasj"] == pytest.approx(100.0)
    assert entry["retrievals"] == pytest.approx(1.0)
    assert 20 < entry["em_lo"] < 50 < entry["em_hi"] <= 75
    assert entry["lasj_lo"] == entry["lasj_hi"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- samples x seeds
class CoinBackend:
    """Answers each prompt "Paris" or "Lyon" at random (seeded by `seed`), greedy: always "Paris"."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.seeds = []

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, seed=None):
        self.seeds.append(seed)
        rng = np.random.default_rng(seed)
        out = []
        for _ in prompts:
            text = "Paris" if temperature == 0 or rng.random() < 0.5 else "Lyon"
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            out.append(Generation(ids, text, [0.0] * len(ids), "eos"))
        return out


RECORDS = [QARecord("a", "kw", "eval", "What is the capital of France?", ["Paris"]),
           QARecord("b", "kw", "eval", "Which city hosts the Louvre?", ["Paris"])]


def test_predict_method_runs_samples_for_every_seed(smollm2_tokenizer):
    from tasks.evaluate import predict_method

    params = load_params(PROJECT_ROOT / "params.yaml", overrides=[
        "evaluate.samples=3", "evaluate.seeds=[11, 12]", "evaluate.temperature=1.0", "evaluate.batch_size=4"])
    backend = CoinBackend(smollm2_tokenizer)
    retriever = KeywordRetriever([("p1", "Paris", "Paris is the capital of France and hosts the Louvre.")])
    for method in ("direct", "rag"):
        rows = predict_method(params, method, backend, None, retriever, RECORDS)
        assert len(rows) == 2 * 3 * 2
        assert sorted((p.id, p.sample) for p in rows) == [(q, s) for q in "ab" for s in range(6)]
        assert {p.seed for p in rows} == {11, 12}
        assert {p.prediction for p in rows} == {"Paris", "Lyon"}  # sampled, not greedy
        assert all(p.segments and p.segments[-1][0] == "model" for p in rows)
    rag = [p for p in rows if p.method == "rag"][0]
    assert rag.segments[0][0] == "env" and "Louvre" in rag.segments[0][1] and rag.queries == [rag.question]
    m = evaluation.summarize(rows, resamples=100)["kw"]["rag"]
    assert m["n"] == 2 and m["samples"] == 6


def test_direct_sampling_seeds_each_batch_differently(smollm2_tokenizer):
    backend = CoinBackend(smollm2_tokenizer)
    evaluation.predict_direct(backend, RECORDS, 8, batch_size=2, n=3, temperature=1.0, seed=5)
    assert backend.seeds == [5, 6, 7]  # 6 prompts in batches of 2: the same question never repeats a seed
    greedy = evaluation.predict_direct(backend, RECORDS, 8, batch_size=2)
    assert [p.sample for p in greedy] == [0, 0] and {p.prediction for p in greedy} == {"Paris"}


def test_agent_samples_keep_their_trajectories(smollm2_tokenizer):
    q = RECORDS[0].question
    backend = ScriptedBackend(smollm2_tokenizer, {q: ["<external>capital of France</external>",
                                                      "<answer>Paris</answer>"]}, "</external>")
    retriever = KeywordRetriever([("p1", "France", "Paris is the capital of France.")])
    preds = evaluation.predict_agent(backend, retriever, RECORDS[:1], "r1searcher_pp", AgentCfg(), "agent", seed=3,
                                     n=2, temperature=1.0)
    assert [(p.sample, p.seed) for p in preds] == [(0, 3), (1, 3)]
    for p in preds:
        assert p.queries == ["capital of France"] and p.retrievals == 1
        roles = [r for r, _ in p.segments]
        assert roles == ["model", "env", "model"] and "Paris is the capital" in p.segments[1][1]
        row = p.row()
        assert row["segments"] == p.segments and row["sample"] == p.sample


# ----------------------------------------------------------------------------- config
def test_sampling_config_is_validated():
    with pytest.raises(ValueError, match="evaluate.temperature"):
        EvaluateCfg(samples=4)
    with pytest.raises(ValueError, match="evaluate.temperature"):
        EvaluateCfg(seeds=[1, 2])
    with pytest.raises(ValueError, match="repeats a seed"):
        EvaluateCfg(seeds=[1, 1], temperature=0.7)
    assert EvaluateCfg(seeds=[3]).seed_list(0) == [3] and EvaluateCfg().seed_list(7) == [7]
    assert EvaluateCfg(methods=["direct", "rag", "rl"]).comparisons() == [("rag", "direct"), ("rl", "direct")]
    with pytest.raises(Exception, match="evaluate.compare: 'rl_x'"):
        load_params(PROJECT_ROOT / "params.yaml", overrides=["evaluate.compare=[[rl, rl_x]]"])
