"""Evaluation of agent methods: the format-valid rate next to the answer metrics, and scoring exactly
what R1-Searcher scores."""

from __future__ import annotations

import json

import pytest

from searchrl import evaluation
from searchrl.agent.fakes import KeywordRetriever, ScriptedBackend
from searchrl.agent.protocols import get_protocol
from searchrl.config import AgentCfg
from searchrl.data.schema import QARecord
from searchrl.models import load_tokenizer

RECORDS = [QARecord("a", "kw", "eval", "What is the capital of France?", ["Paris"]),
           QARecord("b", "kw", "eval", "What is the capital of Germany?", ["Berlin"])]
SCRIPTS = {"What is the capital of France?": ["<internal>Paris is the capital of France.</internal>\n"
                                              "<answer>Paris</answer>"],
           "What is the capital of Germany?": ["<internal>Berlin is the capital.\n<answer>Berlin</answer>"]}


def test_agent_predictions_carry_format_validity():
    tok = load_tokenizer("smollm2-135m-instruct")
    backend = ScriptedBackend(tok, SCRIPTS, "</external>")
    retriever = KeywordRetriever([("p", "France", "Paris is the capital of France.")])
    preds = evaluation.predict_agent(backend, retriever, RECORDS, "r1searcher_pp", AgentCfg(), "sft")
    assert [p.format_valid for p in preds] == [True, False]  # the second never closes <internal>
    assert [p.scores["cem"] for p in preds] == [1.0, 1.0]
    assert preds[0].row()["format_valid"] is True
    direct = evaluation.Prediction("a", "kw", "direct", "q", "Paris", ["Paris"], scores={"em": 1, "f1": 1, "cem": 1})
    metrics = evaluation.summarize(preds + [direct])["kw"]
    assert metrics["sft"]["format_valid"] == 50.0 and "format_valid" not in metrics["direct"]
    table = evaluation.markdown_table({"kw": metrics})
    assert "format_valid" in table.splitlines()[0] and "| kw | sft | 2 | " in table


def test_rollouts_cut_by_the_token_budget_are_counted_and_reported():
    """Evaluation inserting 5 passages per retrieval into a budget that holds two blocks of training's 3
    (params.yaml's evaluate.top_k was 5, agent.top_k 3): the second block no longer fits, the rollout ends
    on length. The share shows as out_of_tokens and one warning line names the keys that fix it."""
    tok = load_tokenizer("smollm2-135m-instruct")
    q = "Which river flows through the capital of France?"
    script = {q: ["<external>capital of France</external>", "<external>river of Paris</external>",
                  "<answer>Seine</answer>"]}
    filler = " ".join(["word"] * 40)
    retriever = KeywordRetriever([(f"p{i}", f"France {i}", f"France Paris river fact {i}. {filler}") for i in range(6)])
    record = QARecord("a", "kw", "eval", q, ["Seine"])
    preds = {k: evaluation.predict_agent(ScriptedBackend(tok, script, "</external>"), retriever, [record],
                                         "r1searcher_pp", AgentCfg(top_k=k, max_total_tokens=450), "sft")
             for k in (3, 5)}
    assert [preds[3][0].finish_reason, preds[5][0].finish_reason] == ["answered", "length"]
    assert evaluation.summarize(preds[3])["kw"]["sft"]["out_of_tokens"] == 0.0
    assert evaluation.summarize(preds[5])["kw"]["sft"]["out_of_tokens"] == 100.0
    assert evaluation.budget_warning(preds[3], "sft", 450, 3, 3) is None
    line = evaluation.budget_warning(preds[5], "sft", 450, 5, 3)
    assert "1 of 1 rollouts ran out of agent.max_total_tokens (450)" in line and "evaluate.top_k=3" in line
    assert "evaluate.top_k" not in evaluation.budget_warning(preds[5], "sft", 450, 3, 3)  # then only the budget
    assert "out_of_tokens" in evaluation.markdown_table(evaluation.summarize(preds[5])).splitlines()[0]


def test_agent_answers_are_scored_raw_like_the_reference():
    """Issue 11 item 5: " False " is not the exact string "False", so it is not mapped to "no" (the
    old code stripped the answer first and scored EM 1 against the gold "no")."""
    tok = load_tokenizer("smollm2-135m-instruct")
    question = "Is Zorvath older than Quell?"
    backend = ScriptedBackend(tok, {question: ["Both are old.</think>\n<answer> False </answer>"]}, "<|end_of_query|>")
    record = QARecord("z", "kw", "eval", question, ["no"])
    pred = evaluation.predict_agent(backend, KeywordRetriever([("p", "T", "x")]), [record], "r1searcher",
                                    AgentCfg(), "agent_r1searcher")[0]
    assert pred.prediction == " False "
    assert pred.scores == {"em": 0.0, "f1": 0.0, "cem": 0.0}
    exact = evaluation.make_prediction(record, "m", "False")  # the exact string still maps to "no"
    assert exact.scores["em"] == 1.0


# METHOD.md B.8: R1-Searcher's released predictions rescored with its metric_calc_rule.py
RELEASED = {"hotpotqa_qwen": {"em": 58.0, "cem": 65.4, "f1": 71.9},
            "bamboogle_qwen": {"em": 45.6, "cem": 52.8, "f1": 57.7}}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_r1searcher_predictions_score_as_published(shared_data, name):
    proto = get_protocol("r1searcher")
    rows = [json.loads(line) for line in
            (shared_data / "r1searcher_predictions" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    preds = []
    for i, r in enumerate(rows):
        # our extraction of the released text gives the released pred_ans exactly, spaces included
        if f"<answer>{r['pred_ans']}</answer>" in r["gen_text_store"]:
            assert proto.extract_answer(r["gen_text_store"]) == r["pred_ans"]
        answer = proto.extract_answer(f"</think>\n<answer>{r['pred_ans']}</answer>")
        preds.append(evaluation.make_prediction(QARecord(str(i), name, "eval", r["question"], [r["answer"]]),
                                                "released", answer))
    metrics = evaluation.summarize(preds)[name]["released"]
    assert metrics["n"] == len(rows)
    assert {k: round(metrics[k], 1) for k in RELEASED[name]} == RELEASED[name]
