"""Memorization (METHOD.md A.6): which rollouts are rewritten, the rewriters, the filter, the split."""

from __future__ import annotations

import pytest

from searchrl.agent.fakes import ScriptedBackend
from searchrl.agent.protocols import get_protocol
from searchrl.agent.trajectory import Segment, Trajectory
from searchrl.errors import ConfigError
from searchrl.training import memorization as M

PP = get_protocol("r1searcher_pp")
HOPS = [{"subject": "Talo Vesk", "relation": "born_in", "object": "Peru", "source": "external"},
        {"subject": "Peru", "relation": "capital", "object": "Lima", "source": "internal"}]
DOCS = "\n<document>\n(1) Talo Vesk: Talo Vesk was born in Peru.\n(2) Peru: Peru is a country.\n</document>\n"


def _traj(qid: str, retrievals: int, answer: str | None, question: str = "What is the capital of the country "
          "where Talo Vesk was born?") -> Trajectory:
    t = Trajectory(qid, question, PP.name, "", [1, 2, 3], retrievals=retrievals, answer=answer)
    for _ in range(retrievals):
        t.segments += [Segment("model", "<external>Talo Vesk birthplace</external>", [5], [0.0]),
                       Segment("env", DOCS, [6, 7], None)]
    t.segments.append(Segment("model", f"<answer>{answer}</answer>", [8], [0.0]))
    return t


def test_hop_statements_and_oracle_rewrite_is_accepted():
    assert M.hop_statement(HOPS[0]) == "Talo Vesk was born in Peru."
    assert M.hop_statement(HOPS[1]) == "The capital of Peru is Lima."
    assert M.hop_statement({"subject": "X", "relation": "member_of", "object": "Y"}) == "X member of Y."
    item = M.RewriteItem("q1", "Q?", "Lima", [], {"hops": HOPS})
    text = M.oracle_rewrite(item)
    assert text == ("<internal>Talo Vesk was born in Peru.</internal>\n<internal>The capital of Peru is Lima."
                    "</internal>\n<answer>Lima</answer>")
    assert M.accept_rewrite(text, ["Lima"], PP)
    assert M.oracle_rewrite(M.RewriteItem("q2", "Q?", "Lima", [], {})) is None  # no hop chain


@pytest.mark.parametrize("text", [
    "<external>capital of Peru</external>\n<answer>Lima</answer>",  # still searches
    "<internal>Peru's capital is Cusco.</internal><answer>Cusco</answer>",  # wrong answer
    "<internal>The capital of Peru is Lima.</internal>",  # no answer
    "<answer>it is Lima which is the capital city of the country of Peru</answer>",  # > 10 words
    "<document>Lima</document><answer>Lima</answer>",  # self-written document
    None, "",
])
def test_bad_rewrites_are_rejected(text):
    assert not M.accept_rewrite(text, ["Lima"], PP)


def test_selection_one_per_question_correct_and_searched_fewest_retrievals():
    trajs = [_traj("q1", 2, "Lima"), _traj("q1", 1, "Lima"), _traj("q1", 0, "Lima"), _traj("q1", 1, "Cusco"),
             _traj("q2", 3, "Lima", "Other question?"), _traj("q3", 1, "Lima", "Third question?")]
    correct = [True, True, True, False, True, False]
    items = M.select_for_rewrite(trajs, correct, {"q1": {"hops": HOPS}})
    assert [(i.question_id, i.answer) for i in items] == [("q1", "Lima"), ("q2", "Lima")]
    assert items[0].info == ["Talo Vesk: Talo Vesk was born in Peru.", "Peru: Peru is a country."]
    assert items[0].metadata == {"hops": HOPS} and items[1].metadata == {}


def test_chunks_partition_the_set():
    xs = list(range(5))
    assert [M.chunk(xs, 2, k) for k in range(2)] == [[0, 1, 2], [3, 4]]
    assert [M.chunk(xs, 3, k) for k in range(3)] == [[0, 1], [2, 3], [4]]
    assert [M.chunk([7], 2, k) for k in range(2)] == [[7], []]


def test_make_rewriter_errors():
    with pytest.raises(ConfigError, match="teacher"):
        M.make_rewriter("teacher")
    with pytest.raises(ConfigError, match="unknown"):
        M.make_rewriter("magic")


def test_build_set_with_oracle_and_policy_rewriters(smollm2_tokenizer):
    tok = smollm2_tokenizer
    trajs = [_traj("q1", 1, "Lima"), _traj("q1", 0, "Lima")]
    golds, meta = {"q1": ["Lima"]}, {"q1": {"hops": HOPS}}
    mem, counts = M.build_memorization_set(trajs, [True, True], golds, meta, M.oracle_rewriter, PP, tok)
    assert counts == {"candidates": 1.0, "accepted": 1.0}
    _, prompt_ids = PP.prompt_ids(tok, trajs[0].question)
    assert mem[0].prompt_ids == prompt_ids
    assert tok.decode(mem[0].completion_ids) == mem[0].text
    # the policy rewriter: a scripted "model" answering the rewrite prompt
    good = ("<internal>Talo Vesk was born in Peru.</internal>"
            "<internal>The capital of Peru is Lima.</internal><answer>Lima</answer>")
    backend = ScriptedBackend(tok, {trajs[0].question: [good]}, query_close="</external>")
    rewriter = M.model_rewriter(backend)
    mem, counts = M.build_memorization_set(trajs, [True, True], golds, meta, rewriter, PP, tok)
    assert counts["accepted"] == 1.0 and mem[0].text == good
    assert "Info:\n(1) Talo Vesk: Talo Vesk was born in Peru." in tok.decode(backend.calls[0][0])
    backend = ScriptedBackend(tok, {trajs[0].question: ["<answer>Cusco</answer>"]}, query_close="</external>")
    rewriter = M.model_rewriter(backend)
    mem, counts = M.build_memorization_set(trajs, [True, True], golds, meta, rewriter, PP, tok)
    assert mem == [] and counts == {"candidates": 1.0, "accepted": 0.0}
