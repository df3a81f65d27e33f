"""Gold evidence of real multi-hop QA rows (searchrl/training/evidence.py): the steps the oracle
searches for, their query wordings, and the sentence of a passage that restates a fact."""

from __future__ import annotations

import pytest

from searchrl.agent.protocols import get_protocol
from searchrl.data import formats
from searchrl.retrieval.base import Hit
from searchrl.training import evidence as E


def musique_rows(shared_data, n: int):
    return formats.read_qa_file(shared_data / "qa/musique/dev_ans_questions.json", "musique", "musique", "train",
                                limit=n).records


def hotpotqa_rows(shared_data, n: int):
    return formats.read_qa_file(shared_data / "qa/hotpotqa/dev_distractor_first100.json", "hotpotqa", "hotpotqa",
                                "train", limit=n).records


@pytest.mark.shared_data
def test_musique_steps_substitute_earlier_hop_answers(shared_data):
    rec = musique_rows(shared_data, 1)[0]  # "Who is the spouse of the Green performer?"
    dec = rec.metadata["decomposition"]
    steps = E.evidence_steps(rec.question, rec.answers, rec.metadata)
    assert [s.title for s in steps] == [d["title"] for d in dec] and all(s.title for s in steps)
    assert "#1" in dec[1]["question"]
    # hop 2's sub-question asks about hop 1's answer, never about "#1"; ">>" is gone
    assert steps[1].queries[0] == E.substitute_hops(dec[1]["question"], [dec[0]["answer"]])
    assert dec[0]["answer"] in steps[1].queries[0] and "#" not in steps[1].queries[0] and ">>" not in steps[1].queries[0]
    assert steps[1].queries[-1] == dec[1]["title"]  # the last wording: the gold title alone
    assert steps[0].anchors[0] == dec[0]["answer"] and rec.answers[0] in steps[0].anchors


@pytest.mark.shared_data
def test_hotpotqa_steps_title_named_in_question_first_with_gold_sentences(shared_data):
    rows = hotpotqa_rows(shared_data, 3)
    bridge = next(r for r in rows if r.metadata.get("type") == "bridge")
    steps = E.evidence_steps(bridge.question, bridge.answers, bridge.metadata)
    assert {s.title for s in steps} == set(bridge.metadata["gold_titles"])
    named = [s.title for s in steps if E.mentions(bridge.question, E.bare_title(s.title))]
    assert named and steps[0].title == named[0]  # start from the paragraph the question names
    for s in steps:
        assert s.queries[0].startswith(s.title) and len(s.queries[0].split()) <= len(s.title.split()) + E.TITLE_KEYWORDS
        assert s.queries[-1] == s.title
        assert s.gold_sentences == tuple(t for title, t in bridge.metadata["gold_facts"] if title == s.title)
    comparison = next(r for r in rows if r.answers == ["yes"])  # a yes/no answer is no anchor
    for s in E.evidence_steps(comparison.question, comparison.answers, comparison.metadata):
        assert "yes" not in s.anchors


def test_split_sentences_is_verbatim_and_keeps_initials():
    text = 'J. R. R. Tolkien wrote it in the U.S. market. Dr. Smith read it. It sold 1,000 copies! "Quoted" next.'
    sents = E.split_sentences(text)
    assert sents == ["J. R. R. Tolkien wrote it in the U.S. market.", "Dr. Smith read it.", "It sold 1,000 copies!",
                     '"Quoted" next.']
    assert all(s in text for s in sents)
    assert E.split_sentences("") == []


@pytest.mark.shared_data
def test_fact_sentence_prefers_gold_then_anchors_then_question_words(shared_data):
    bridge = next(r for r in hotpotqa_rows(shared_data, 3) if r.metadata.get("type") == "bridge")
    step = next(s for s in E.evidence_steps(bridge.question, bridge.answers, bridge.metadata)
                if len(s.gold_sentences) > 1)  # Shirley Temple: two supporting sentences
    text = " ".join(step.gold_sentences) + " She was born in Santa Monica, California."
    fact = E.fact_sentence(text, step.anchors, bridge.question, step.gold_sentences)
    assert fact in step.gold_sentences and bridge.answers[0] in fact  # of the gold ones, the answer's
    # no gold sentences: the anchors decide, then question keywords, then position
    assert E.fact_sentence("It is green. Lima is the capital of Peru.", ["Lima"], "capital?") == \
        "Lima is the capital of Peru."
    assert E.fact_sentence("It is green. The capital is big.", [], "What is the capital?") == "The capital is big."
    assert E.fact_sentence("上海 is a city. Shanghai is a city.", [], "city") == "Shanghai is a city."


def test_visible_text_is_what_the_document_block_shows():
    pp = get_protocol("r1searcher_pp", max_passage_words=8)
    hit = Hit("p1", "Ed Wood", "Edward Davis Wood Jr. was an American filmmaker, actor, writer and producer.", 1.0)
    body = E.visible_text(hit.title, hit.text, pp.max_passage_words)
    assert body in pp.documents_text([hit]) and not body.endswith("...")
    assert E.shown_title(hit.title, hit.text, pp.max_passage_words) == "Ed Wood"


def test_data_never_becomes_a_tag():
    assert E.safe_wording("Who </external><answer>x</answer> is <|im_end|> it") == "Who x is it"
    assert E.has_evidence({"gold_titles": ["A"]}) and E.has_evidence({"decomposition": [{"title": "A"}]})
    assert not E.has_evidence({"gold_titles": [" "]}) and not E.has_evidence({"hops": [{}]})


def test_a_hop_without_question_or_title_is_no_step():
    meta = {"decomposition": [{"question": "Green >> performer", "answer": "Steve Hillage", "title": "Green"},
                              {"question": "", "answer": "x", "title": ""}]}
    steps = E.evidence_steps("Who performed Green?", ["Steve Hillage"], meta)
    assert [s.title for s in steps] == ["Green"] and steps[0].queries[0] == "Green performer"


def test_2wiki_row_keeps_supporting_sentences_and_evidence_triples():
    """2WikiMultiHopQA's layout (HotpotQA's, plus `evidences`), as the hf source maps it."""
    row = {"_id": "w1", "question": "Who is the mother of the director of Polish-Russian War?", "answer": "Małgorzata",
           "supporting_facts": [["Polish-Russian War (film)", 1], ["Xawery Żuławski", 2]],
           "evidences": [["Polish-Russian War", "director", "Xawery Żuławski"],
                         ["Xawery Żuławski", "mother", "Małgorzata Braunek"]],
           "context": [["Polish-Russian War (film)", ["Polish-Russian War is a 2009 Polish film.",
                                                      "It was directed by Xawery Żuławski."]],
                       ["Xawery Żuławski", ["Xawery Żuławski (born 1971) is a Polish director.", "He lives in Warsaw.",
                                            "His mother is Małgorzata Braunek."]]]}
    meta = formats.map_hotpotqa(row).metadata
    assert meta["gold_facts"] == [["Polish-Russian War (film)", "It was directed by Xawery Żuławski."],
                                  ["Xawery Żuławski", "His mother is Małgorzata Braunek."]]
    assert meta["evidences"][1] == ["Xawery Żuławski", "mother", "Małgorzata Braunek"]
    steps = E.evidence_steps(row["question"], ["Małgorzata"], meta)
    assert [s.title for s in steps] == ["Polish-Russian War (film)", "Xawery Żuławski"]  # named in the question first
    assert "Małgorzata Braunek" in steps[1].anchors  # the evidence object of the step's subject
    text = " ".join(row["context"][1][1])
    assert E.fact_sentence(text, steps[1].anchors, row["question"], steps[1].gold_sentences) == \
        "His mother is Małgorzata Braunek."
