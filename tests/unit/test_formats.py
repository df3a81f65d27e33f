from __future__ import annotations

import json
from pathlib import Path

import pytest

from searchrl.data import formats
from searchrl.errors import InputError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


HOTPOT_ORIGINAL = {
    "_id": "5a8b57f25542995d1e6f1371", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
    "answer": "yes", "type": "comparison", "level": "hard",
    "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
    "context": [["Ed Wood", ["Edward Davis Wood Jr. was an American filmmaker.", " He was born in 1924."]],
                ["Scott Derrickson", ["Scott Derrickson is an American director."]],
                ["Tyler Bates", ["Tyler Bates is an American musician."]]],
}
HOTPOT_HF = {  # the Hugging Face layout, as in ../shared/data/qa/hotpotqa/dev_distractor_first100.json
    "question": "Which city is the capital of the band's home country?", "answer": "Oslo", "type": "bridge",
    "level": "medium", "supporting_facts": {"title": ["A-ha", "Norway"], "sent_id": [0, 1]},
    "context": {"title": ["A-ha", "Norway"],
                "sentences": [["A-ha is a Norwegian band."], ["Norway is a country.", " Its capital is Oslo."]]},
}
IRCOT = {
    "question_id": "q1", "question_text": "What position did the actress hold?",
    "answers_objects": [{"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["Chief of Protocol"]}],
    "contexts": [{"id": "0", "title": "Meet Corliss Archer", "paragraph_text": "A radio program.",
                  "is_supporting": False},
                 {"id": "1", "title": "Shirley Temple", "paragraph_text": "She served as Chief of Protocol.",
                  "is_supporting": True}],
}
MUSIQUE = {
    "id": "2hop__1_2", "question": "Who is the spouse of the Green performer?", "answer": "Miquette Giraudy",
    "answer_aliases": ["M. Giraudy"], "answerable": True,
    "question_decomposition": [
        {"id": 1, "question": "Green >> performer", "answer": "Steve Hillage", "paragraph_support_idx": 10,
         "document_id": "Green (Steve Hillage album)_0"},
        {"id": 2, "question": "#1 >> spouse", "answer": "Miquette Giraudy", "paragraph_support_idx": 5,
         "document_id": "Miquette Giraudy_0"}],
}


# ----------------------------------------------------------------------------- QA formats
def test_r1searcher_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "hotpotqa_500.jsonl", [
        {"idx": 1, "question": "Who wrote Hamlet?", "answer": "Shakespeare", "gen_text_store": ""},
        {"idx": 2, "question": " Is water wet? ", "answer": True, "gen_text_store": ""},
        {"idx": 3, "question": "Which years?", "answer": ["1990", 1991, "1990"]},
    ])
    qf = formats.read_qa_file(path, split="train")
    assert qf.format == "r1searcher" and qf.lines == [1, 2, 3]
    assert [r.id for r in qf.records] == ["hotpotqa_500-1", "hotpotqa_500-2", "hotpotqa_500-3"]
    assert [r.answers for r in qf.records] == [["Shakespeare"], ["yes"], ["1990", "1991"]]
    assert qf.records[1].question == "Is water wet?"
    assert {r.split for r in qf.records} == {"train"} and qf.records[0].dataset == "hotpotqa_500"
    assert qf.records[0].metadata == {"source_id": "1"}


def test_flashrag_jsonl_with_dataset_name_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "nq.jsonl", [
        {"id": f"test_{i}", "question": f"q{i}?", "golden_answers": [f"a{i}", f"b{i}"]} for i in range(5)])
    qf = formats.read_qa_file(path, dataset="nq", limit=2)
    assert qf.format == "flashrag"
    assert [r.id for r in qf.records] == ["nq-test_0", "nq-test_1"]
    assert qf.records[0].answers == ["a0", "b0"]


@pytest.mark.parametrize("record", [HOTPOT_ORIGINAL, HOTPOT_HF], ids=["original", "hf-layout"])
def test_hotpotqa_json_list_both_context_layouts(tmp_path, record):
    path = write_json(tmp_path / "dev.json", [record, {**record, "_id": "second", "question": "Another?"}])
    qf = formats.read_qa_file(path)
    assert qf.format == "hotpotqa" and len(qf.records) == 2
    first = qf.records[0]
    assert first.answers == [record["answer"]]
    assert first.metadata["gold_titles"] == (["Scott Derrickson", "Ed Wood"] if "_id" in record else ["A-ha", "Norway"])
    assert first.metadata["type"] == record["type"]
    titles = [p.title for p in qf.contexts[:3]]
    assert titles[0] in ("Ed Wood", "A-ha")
    ed = qf.contexts[0].text
    assert ed in ("Edward Davis Wood Jr. was an American filmmaker. He was born in 1924.", "A-ha is a Norwegian band.")
    assert qf.lines[0] == 2  # each array element's starting line
    assert all(p.source == "dev" for p in qf.contexts)


def test_hotpotqa_without_ids_numbers_rows(tmp_path):
    path = write_json(tmp_path / "first.json", [HOTPOT_HF, {**HOTPOT_HF, "question": "Second?"}])
    qf = formats.read_qa_file(path)
    assert [r.id for r in qf.records] == ["first-1", "first-2"]
    assert [r.metadata["source_id"] for r in qf.records] == ["1", "2"]


def test_ircot_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "ircot.jsonl", [IRCOT])
    qf = formats.read_qa_file(path, dataset="hotpotqa")
    (r,) = qf.records
    assert qf.format == "ircot" and r.id == "hotpotqa-q1"
    assert r.answers == ["Chief of Protocol"] and r.metadata["gold_titles"] == ["Shirley Temple"]
    assert [(p.title, p.text) for p in qf.contexts] == [("Meet Corliss Archer", "A radio program."),
                                                       ("Shirley Temple", "She served as Chief of Protocol.")]
    assert qf.context_lines == [1, 1]


def test_musique_json_list_and_jsonl_with_paragraphs(tmp_path):
    qf = formats.read_qa_file(write_json(tmp_path / "musique.json", [MUSIQUE]))
    (r,) = qf.records
    assert qf.format == "musique"
    assert r.answers == ["Miquette Giraudy", "M. Giraudy"]
    assert r.metadata["gold_titles"] == ["Green (Steve Hillage album)", "Miquette Giraudy"]
    assert r.metadata["n_hops"] == 2 and r.metadata["decomposition"][0]["answer"] == "Steve Hillage"
    with_paragraphs = {**MUSIQUE, "paragraphs": [
        {"idx": 0, "title": "Green", "paragraph_text": "Green is an album by Steve Hillage.", "is_supporting": True},
        {"idx": 1, "title": "Other", "paragraph_text": "Unrelated.", "is_supporting": False}]}
    unanswerable = {**MUSIQUE, "id": "x", "answerable": False}
    qf = formats.read_qa_file(write_jsonl(tmp_path / "musique_full.jsonl", [with_paragraphs, unanswerable]))
    assert len(qf.records) == 1 and qf.skipped == 1
    assert qf.records[0].metadata["gold_titles"] == ["Green"]
    assert [p.title for p in qf.contexts] == ["Green", "Other"]


@pytest.mark.parametrize("record,fmt", [
    ({"idx": 1, "question": "q?", "answer": "a"}, "r1searcher"),
    ({"id": "1", "question": "q?", "golden_answers": ["a"]}, "flashrag"),
    (HOTPOT_ORIGINAL, "hotpotqa"),
    (IRCOT, "ircot"),
    (MUSIQUE, "musique"),
    ({"title": "T", "text": "x"}, "passages"),
])
def test_auto_detects_each_format(tmp_path, record, fmt):
    assert formats.detect_format(write_jsonl(tmp_path / "f.jsonl", [record])) == fmt
    assert formats.detect_format(write_json(tmp_path / "f.json", [record])) == fmt


def test_passage_file_listed_as_qa_and_unknown_fields_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="passage file, listed as a QA file"):
        formats.read_qa_file(write_jsonl(tmp_path / "c.jsonl", [{"title": "T", "text": "x"}]))
    with pytest.raises(InputError, match=r"u\.jsonl, line 1: cannot tell the format .*\['foo'\]"):
        formats.read_qa_file(write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}]))
    with pytest.raises(InputError, match="file is empty"):
        formats.read_qa_file(write_jsonl(tmp_path / "empty.jsonl", []))


# ----------------------------------------------------------------------------- bad QA input
def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"idx": 1, "question": "q?", "answer": "a"}\n{"idx": 2, "question": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl, line 2: malformed JSON"):
        formats.read_qa_file(path, "r1searcher")


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question": "q?", "answer": "a", "context": []},\n  {"question": oops}\n]', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.json, line 3: malformed JSON") as err:
        formats.read_qa_file(path, "hotpotqa")
    assert err.value.row == 3


@pytest.mark.parametrize("row,field,message", [
    ({"idx": 1, "answer": "a"}, "question", "missing field"),
    ({"idx": 1, "question": "q?"}, "answer", "missing field"),
    ({"idx": 1, "question": "   ", "answer": "a"}, "question", "empty question"),
    ({"idx": 1, "question": "q?", "answer": ""}, "answer", "empty answer"),
    ({"idx": 1, "question": "q?", "answer": []}, "answer", "empty answer list"),
    ({"idx": 1, "question": "q?", "answer": None}, "answer", "null"),
    ({"idx": 1, "question": ["q?"], "answer": "a"}, "question", "expected a string"),
])
def test_missing_or_empty_fields_name_file_line_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"idx": 0, "question": "ok?", "answer": "ok"}, row])
    with pytest.raises(InputError, match=message) as err:
        formats.read_qa_file(path, "r1searcher")
    assert (err.value.row, err.value.field, err.value.path) == (2, field, str(path))
    assert f"qa.jsonl, line 2, field '{field}'" in str(err.value)


@pytest.mark.parametrize("row,field,message", [
    ({"idx": 1, "question": "q?", "answer": float("nan")}, "answer", "answer is nan"),  # JSON NaN
    ({"idx": 1, "question": "q?", "answer": float("inf")}, "answer", "answer is inf"),
    ({"idx": 1, "question": "q?", "answer": ["ok", float("nan")]}, "answer", "answer is nan"),
    ({"idx": 1, "question": "\u200b \ufeff\u2060", "answer": "a"}, "question", "empty question"),
    ({"idx": 1, "question": "q?", "answer": "\u200b"}, "answer", "empty answer"),
    ({"idx": 1, "question": "q?", "answer": ["\u200b", " "]}, "answer", "empty answer list"),
])
def test_blank_looking_values_are_errors(tmp_path, row, field, message):
    """Issue 11 item 7: a JSON NaN answer used to become the gold answer "nan", a zero-width
    question or answer passed as text."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"idx": 0, "question": "ok?", "answer": "ok"}) + "\n" + json.dumps(row) + "\n",
                    encoding="utf-8")
    if row["answer"] != row["answer"] or row["answer"] == float("inf"):
        assert "NaN" in path.read_text() or "Infinity" in path.read_text()  # JSON's NaN, as json.loads reads it
    with pytest.raises(InputError, match=message) as err:
        formats.read_qa_file(path, "r1searcher")
    assert (err.value.row, err.value.field, err.value.path) == (2, field, str(path))


def test_invisible_characters_around_values_are_trimmed(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"id": "1", "question": "\ufeffWho? \u200b",
                                                "golden_answers": ["\u200bParis\u200b", 1812, 2.5, True]}])
    r = formats.read_qa_file(path).records[0]
    assert (r.question, r.answers) == ("Who?", ["Paris", "1812", "2.5", "yes"])
    blank = write_jsonl(tmp_path / "p.jsonl", [{"title": "A", "text": "x"}, {"title": "B", "text": "\u200b\u00ad "}])
    with pytest.raises(InputError, match=r"line 2, field 'text': empty passage text"):
        formats.read_passage_file(blank)
    hotpot = {**HOTPOT_ORIGINAL, "context": [["Ed Wood", ["\u200b", " "]], ["Scott Derrickson", ["Text."]]]}
    qf = formats.read_qa_file(write_json(tmp_path / "h.json", [hotpot]), "hotpotqa")
    assert [(p.title, p.text) for p in qf.contexts] == [("Scott Derrickson", "Text.")]


def test_flashrag_contents_without_a_title_line(tmp_path):
    """Issue 11 item 2: FlashRAG's `contents` is '"Title"\\ntext'; a row without a newline used to
    become a passage whose title was the whole text (shown twice to the agent)."""
    words = " ".join(f"w{i}" for i in range(427))
    path = write_jsonl(tmp_path / "flashrag.jsonl", [
        {"id": "1", "contents": words},
        {"id": "2", "contents": '"Oslo"\nOslo is the capital.\nIt is in Norway.'},
        {"id": "3", "contents": "Bergen\nBergen is a city."},
        {"id": "4", "title": "Given", "contents": "no newline here"},
    ])
    a, b, c, d = formats.read_passage_file(path).passages
    assert (a.title, a.text) == ("", words)
    assert (b.title, b.text) == ("Oslo", "Oslo is the capital.\nIt is in Norway.")
    assert (c.title, c.text) == ("Bergen", "Bergen is a city.")
    assert (d.title, d.text) == ("Given", "no newline here")


def test_empty_answer_lists_in_other_formats(tmp_path):
    with pytest.raises(InputError, match="line 1, field 'golden_answers': empty answer list"):
        formats.read_qa_file(write_jsonl(tmp_path / "f.jsonl", [{"id": "1", "question": "q?", "golden_answers": []}]))
    bad_ircot = {**IRCOT, "answers_objects": [{"spans": []}]}
    with pytest.raises(InputError, match=r"field 'answers_objects\[\]\.spans': empty answer list"):
        formats.read_qa_file(write_jsonl(tmp_path / "i.jsonl", [bad_ircot]), "ircot")


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [
        {"id": "a", "question": "q1?", "golden_answers": ["x"]},
        {"id": "b", "question": "q2?", "golden_answers": ["x"]},
        {"id": "a", "question": "q3?", "golden_answers": ["y"]},
    ])
    with pytest.raises(InputError, match=r"dup\.jsonl, line 3, field 'id': duplicate id 'a' \(also on line 1\)"):
        formats.read_qa_file(path)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"idx": 1, "question": "q?", "answer": "a"}).encode()
    path.write_bytes(good + b"\n" + '{"idx": 2, "question": "Caf\u00e9?", "answer": "a"}'.encode("latin-1") + b"\n")
    with pytest.raises(InputError, match=r"latin1\.jsonl, line 2: not valid UTF-8.*re-encode"):
        formats.read_qa_file(path, "r1searcher")
    corpus = tmp_path / "corpus.tsv"
    corpus.write_bytes(b"1\tfine text\tTitle\n2\t" + "Caf\u00e9".encode("latin-1") + b"\tT\n")
    with pytest.raises(InputError, match=r"corpus\.tsv, line 2: not valid UTF-8"):
        formats.read_passage_file(corpus)


def test_good_files_lose_nothing(tmp_path):
    rows = [{"idx": i, "question": f"Question {i}?", "answer": f"a{i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    qf = formats.read_qa_file(path)
    assert [r.question for r in qf.records] == [r["question"] for r in rows]


# ----------------------------------------------------------------------------- passages
def test_passage_jsonl_layouts(tmp_path):
    path = write_jsonl(tmp_path / "wiki.jsonl", [
        {"title": "Paris", "text": "Paris is the capital of France.", "source": "x"},
        {"id": "7", "contents": '"Oslo"\nOslo is the capital of Norway.'},
        {"_id": "12", "wikipedia_title": "A", "text": ["A\n", "A is a letter.\n", "Section::::History.\n",
                                                       "BULLET::::- It is old.\n"]},
    ])
    pf = formats.read_passage_file(path)
    a, b, c = pf.passages
    assert (a.title, a.text, a.source) == ("Paris", "Paris is the capital of France.", "wiki")
    assert a.id.startswith("wiki-") and len(a.id) == len("wiki-") + 16
    assert (b.id, b.title, b.text) == ("wiki-7", "Oslo", "Oslo is the capital of Norway.")
    assert (c.id, c.title, c.text) == ("wiki-12", "A", "A is a letter. History. - It is old.")
    assert pf.lines == [1, 2, 3]
    # content-hash ids are stable across runs and files
    again = formats.read_passage_file(path)
    assert [p.id for p in again.passages] == [p.id for p in pf.passages]


def test_passage_tsv_layouts(tmp_path):
    dpr = tmp_path / "psgs.tsv"
    dpr.write_text('id\ttext\ttitle\n1\t"Aaron is a prophet ""of"" Moses."\tAaron\n2\tSecond text\tB\n', encoding="utf-8")
    pf = formats.read_passage_file(dpr, dataset="dpr")
    assert [(p.id, p.title, p.text) for p in pf.passages] == [
        ("dpr-1", "Aaron", 'Aaron is a prophet "of" Moses.'), ("dpr-2", "B", "Second text")]
    kilt = tmp_path / "kilt.tsv"
    kilt.write_text("0\tA   A is the first letter.\n1\tTitle: Lucy Mair Text:  Lucy Mair was an anthropologist.\n"
                    "2\tplain passage with no title\n3\tsome text\tSome Title\n", encoding="utf-8")
    pf = formats.read_passage_file(kilt)
    assert [(p.title, p.text) for p in pf.passages] == [
        ("A", "A is the first letter."), ("Lucy Mair", "Lucy Mair was an anthropologist."),
        ("", "plain passage with no title"), ("Some Title", "some text")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\ta\tb\tc\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.tsv, line 1: expected 2 or 3"):
        formats.read_passage_file(bad)


def test_passage_errors(tmp_path):
    with pytest.raises(InputError, match=r"empty\.jsonl: empty corpus file"):
        formats.read_passage_file(write_jsonl(tmp_path / "empty.jsonl", []))
    blank = tmp_path / "blank.tsv"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="empty corpus file"):
        formats.read_passage_file(blank)
    with pytest.raises(InputError, match=r"line 2, field 'text': empty passage text"):
        formats.read_passage_file(write_jsonl(tmp_path / "e.jsonl", [{"title": "A", "text": "x"},
                                                                       {"title": "B", "text": "  "}]))
    with pytest.raises(InputError, match=r"line 1, field 'text': missing field"):
        formats.read_passage_file(write_jsonl(tmp_path / "m.jsonl", [{"title": "A"}]))
    with pytest.raises(InputError, match=r"line 2, field 'id': duplicate passage id '1' \(also on line 1\)"):
        formats.read_passage_file(write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "title": "A", "text": "x"},
                                                                       {"id": 1, "title": "B", "text": "y"}]))
    with pytest.raises(InputError, match=r"bad\.jsonl, line 1: malformed JSON"):
        path = tmp_path / "bad.jsonl"
        path.write_text("{oops\n", encoding="utf-8")
        formats.read_passage_file(path)


# ----------------------------------------------------------------------------- the real files
QA_FILES = {  # path under ../shared/data -> (format, rows)
    "qa/r1searcher/eval/hotpotqa_500.jsonl": ("r1searcher", 500),
    "qa/r1searcher/eval/2wiki_500.jsonl": ("r1searcher", 500),
    "qa/r1searcher/eval/musique_500.jsonl": ("r1searcher", 500),
    "qa/r1searcher/eval/bamboogle.jsonl": ("r1searcher", 125),
    "qa/r1searcher/train/stage_1.jsonl": ("r1searcher", 350),
    "qa/r1searcher/train/stage_2.jsonl": ("r1searcher", 8148),
    "qa/hotpotqa/dev_ircot500_with_contexts.jsonl": ("ircot", 500),
    "qa/hotpotqa/dev_distractor_first100.json": ("hotpotqa", 100),
    "qa/musique/dev_ans_questions.json": ("musique", 2417),
    "qa/flashrag/nq_test.jsonl": ("flashrag", 1000),
    "qa/flashrag/popqa_test.jsonl": ("flashrag", 1000),
    "qa/flashrag/triviaqa_test.jsonl": ("flashrag", 1000),
    "qa/flashrag/bamboogle_test.jsonl": ("flashrag", 125),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("rel", sorted(QA_FILES))
def test_real_qa_files(shared_data, rel):
    fmt, rows = QA_FILES[rel]
    qf = formats.read_qa_file(shared_data / rel)
    assert qf.format == fmt and len(qf.records) == rows
    assert all(r.question and r.answers and all(r.answers) for r in qf.records)
    if fmt in ("ircot", "hotpotqa"):
        titles_per_line: dict[int, set] = {}
        for p, line in zip(qf.contexts, qf.context_lines, strict=True):
            titles_per_line.setdefault(line, set()).add(p.title)
        for r, line in zip(qf.records, qf.lines, strict=True):
            assert r.metadata["gold_titles"] and set(r.metadata["gold_titles"]) <= titles_per_line[line]
    if fmt == "musique":
        assert all(r.metadata["gold_titles"] and r.metadata["n_hops"] >= 2 for r in qf.records)


@pytest.mark.shared_data
def test_real_corpus_files(shared_data):
    counts = {}
    for path in sorted((shared_data / "corpus").glob("*.jsonl")):
        pf = formats.read_passage_file(path)
        counts[path.stem] = len(pf.passages)
        assert all(p.title and p.text for p in pf.passages)
    assert counts["wiki_paragraphs_hotpotqa"] == 13373 and counts["wiki_paragraphs_kilt_wiki100w"] == 7000
    assert sum(counts.values()) == 55058  # every line of the eight files (DATA.md: about 54,000)
