"""Evaluation of agent methods: the format-valid rate next to the answer metrics."""

from __future__ import annotations

from searchrl import evaluation
from searchrl.agent.fakes import KeywordRetriever, ScriptedBackend
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
