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


# ----------------------------------------------------------------------------- the oracle on real evidence
@pytest.fixture
def real_rollouts(shared_data, tmp_path, smollm2_tokenizer):
    """Correct, searched rollouts on 8 IRCoT HotpotQA and 24 MuSiQue-Ans dev rows: the evidence oracle's
    trajectories over a BM25 index of the IRCoT rows' paragraphs and the MuSiQue context paragraphs."""
    from searchrl.config import AgentCfg, IndexCfg
    from searchrl.data import formats
    from searchrl.retrieval.index import build_index, load_index
    from searchrl.training import sampling

    ircot = formats.read_qa_file(shared_data / "qa/hotpotqa/dev_ircot500_with_contexts.jsonl", "ircot", "hotpotqa",
                                 "train", limit=8)
    musique = formats.read_qa_file(shared_data / "qa/musique/dev_ans_questions.json", "musique", "musique", "train",
                                   limit=24)
    corpus = formats.read_passage_file(shared_data / "corpus/wiki_paragraphs_musique.jsonl").passages
    build_index(list({p.id: p for p in [*ircot.contexts, *corpus]}.values()), IndexCfg(kind="bm25"), tmp_path / "ix")
    agent = AgentCfg(max_total_tokens=1024, max_segment_tokens=160, top_k=3, max_passage_words=60)
    records = [*ircot.records, *musique.records]
    trajs = sampling.oracle_rollouts(records, smollm2_tokenizer, load_index(tmp_path / "ix"), PP, agent, 1, 0)
    return records, [t for t in trajs if t.finish_reason == "answered" and t.retrievals]


@pytest.mark.shared_data
def test_oracle_rewriter_restates_the_retrieved_gold_facts_on_real_data(real_rollouts, smollm2_tokenizer):
    """HotpotQA / MuSiQue records have no hop chain: the old oracle rewriter returned None for every one
    of them, so the memorization set was always empty ("rl" == "rl_no_memorization")."""
    from searchrl.training.evidence import evidence_steps, title_matches

    records, trajs = real_rollouts
    by_id = {r.id: r for r in records}
    golds, meta = {r.id: r.answers for r in records}, {r.id: r.metadata for r in records}
    mem, counts = M.build_memorization_set(trajs, [True] * len(trajs), golds, meta, M.oracle_rewriter, PP,
                                           smollm2_tokenizer)
    assert counts["candidates"] == len({t.question_id for t in trajs}) and counts["accepted"] >= 1
    assert {e.question_id.split("-")[0] for e in mem} == {"hotpotqa", "musique"}
    items = {it.question_id: it for it in M.select_for_rewrite(trajs, [True] * len(trajs), meta)}
    for e in mem:
        rec, item = by_id[e.question_id], items[e.question_id]
        assert "<external>" not in e.text and "<document>" not in e.text and M.accept_rewrite(e.text, rec.answers, PP)
        assert e.text.endswith(f"<answer>{item.answer}</answer>")
        facts = [f.split("</internal>")[0] for f in e.text.split("<internal>")[1:]]
        steps = evidence_steps(rec.question, rec.answers, rec.metadata)
        # each recalled fact is verbatim text of a gold passage this rollout retrieved, in the steps' order
        sources = [next(i for i, s in enumerate(steps) for p in item.info
                        if p.lower().startswith(s.title.lower() + ": ") and f in p) for f in facts]
        assert facts and sources == sorted(sources)
        assert all(any(title_matches(p.split(": ", 1)[0], steps[i].title) for p in item.info) for i in sources)


@pytest.mark.shared_data
def test_oracle_rewrite_needs_a_retrieved_gold_paragraph(real_rollouts):
    records, trajs = real_rollouts
    item = M.select_for_rewrite(trajs[:1], [True], {r.id: r.metadata for r in records})[0]
    assert M.oracle_rewrite(item) is not None
    distractors = [p for p in item.info if not any(p.lower().startswith(t.lower() + ": ")
                                                   for t in item.metadata.get("gold_titles", []))]
    assert M.oracle_rewrite(M.RewriteItem(item.question_id, item.question, item.answer, distractors,
                                          item.metadata)) is None
    assert M.oracle_rewrite(M.RewriteItem("x", "Who?", "Bob", item.info, {})) is None  # no evidence at all


# ----------------------------------------------------------------------------- start-up checks of rl.rewriter
def _params(overlay: dict):
    from searchrl.config import deep_merge, load_yaml, validate
    from tests.conftest import PROJECT_ROOT

    return validate(deep_merge(load_yaml(PROJECT_ROOT / "params.yaml"), overlay))


@pytest.fixture
def answers_only(shared_data) -> dict:
    """A jsonl source whose training questions have answers only (R1-Searcher stage 2), no oracle sampler."""
    return {"prepare": {"source": "jsonl", "jsonl": {
        "train": [{"path": str(shared_data / "qa/r1searcher/train/stage_2.jsonl"), "format": "r1searcher"}],
        "corpus": [{"path": str(shared_data / "corpus/wiki_paragraphs_musique.jsonl"), "format": "passages"}]}},
        "sample": {"sampler": ["policy"]}}


@pytest.mark.shared_data
def test_oracle_rewriter_without_evidence_is_a_start_up_error(answers_only):
    from searchrl.config import deep_merge

    with pytest.raises(ConfigError, match=r"rl\.rewriter: 'oracle' needs gold evidence \(Knowledge World hop chains "
                                          r"or HotpotQA/2Wiki/MuSiQue supporting facts\); prepare\.source jsonl with "
                                          r"format r1searcher has none — use policy or teacher$"):
        _params(deep_merge(answers_only, {"rl": {"rewriter": "oracle"}}))
    # an ablation overlay is checked too, and named
    bad = {"rl": {"rewriter": "policy"}, "rl_ablations": {"mem_oracle": {"rewriter": "oracle"}}}
    with pytest.raises(ConfigError, match=r"rl_ablations\.mem_oracle\.rewriter: 'oracle' needs gold evidence"):
        _params(deep_merge(answers_only, bad))
    # runs that never rewrite are fine: memorization off (the r1searcher ablation inherits rewriter: oracle)
    off = _params(deep_merge(answers_only, {"rl": {"rewriter": "oracle", "memorization": False}}))
    assert off.rl_config("r1searcher").rewriter == "oracle" and not off.rl_config("r1searcher").memorization
    assert _params(deep_merge(answers_only, {"rl": {"rewriter": "policy"}})).rl.rewriter == "policy"


@pytest.mark.shared_data
def test_teacher_rewriter_without_a_teacher_is_a_start_up_error(answers_only):
    from searchrl.config import deep_merge

    with pytest.raises(ConfigError, match=r"rl\.rewriter: 'teacher' needs sample\.teacher_model"):
        _params(deep_merge(answers_only, {"rl": {"rewriter": "teacher"}}))
    ok = _params(deep_merge(answers_only, {"rl": {"rewriter": "teacher"}, "sample": {"teacher_model": "some/model"}}))
    assert ok.rl.rewriter == "teacher"


def test_empty_set_warning_after_window_steps():
    assert M.empty_set_warning([0, 0], [0, 0], 3, "oracle") is None  # fewer steps than the window
    assert M.empty_set_warning([0, 1, 0, 0], [1, 1, 1, 1], 3, "oracle") is None  # not empty throughout
    nothing = M.empty_set_warning([1, 0, 0, 0], [1, 0, 0, 0], 3, "oracle")
    assert "empty for 3 steps" in nothing and "nothing to rewrite" in nothing and "rl.rewriter: oracle" in nothing
    rejected = M.empty_set_warning([0, 0, 0], [2, 0, 1], 3, "policy")
    assert "offered 3 correct searched rollouts" in rejected and "\n" not in rejected


def test_nll_sum_over_kept_logits_equals_the_full_sequence_computation(tiny_model_dir):
    """nll_sum computes logits only from the first label-predicting position on; value and gradient
    equal the plain computation over every position (prompts of different lengths, right padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(10, 1000, (n,), generator=g).tolist()  # noqa: E731
    examples = [M.MemoryExample("a", "", ids(7), ids(5)), M.MemoryExample("b", "", ids(3), ids(9)),
                M.MemoryExample("c", "", ids(12), ids(1))]
    nll, n = M.nll_sum(model, examples, pad_id=0)
    nll.backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = torch.zeros(())
    for e in examples:  # one unpadded sequence at a time, logits at every position
        seq = torch.tensor([e.prompt_ids + e.completion_ids])
        logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1], dim=-1)
        pos = torch.arange(len(e.prompt_ids) - 1, seq.size(1) - 1)
        ref = ref - logp[pos, seq[0, pos + 1]].sum()
    ref.backward()
    assert n == 15
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(fast, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
