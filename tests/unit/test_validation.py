"""Great Expectations suites: passing frames, every failure path, the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from searchrl.errors import DataValidationError
from searchrl.validation import validate_frame
from searchrl.validation.suites import build_suite, documents_after_query, non_empty_string_list


def qa_frame(**overrides) -> pd.DataFrame:
    cols = {
        "id": ["q1", "q2", "q3"],
        "dataset": ["kw", "kw", "hotpotqa"],
        "split": ["train", "eval", "eval"],
        "question": ["Who founded Acme?", "Where is Zed?", "When?"],
        "answers": [["Ann Lee"], np.array(["Paris", "Paris, France"]), ("1812",)],  # list, parquet array, tuple
        "metadata": ["{}", "{}", '{"qtype": "real_1hop"}'],
    }
    cols.update(overrides)
    return pd.DataFrame(cols)


def corpus_frame(**overrides) -> pd.DataFrame:
    cols = {"id": ["p1", "p2"], "title": ["Acme", ""], "text": ["Acme was founded by Ann Lee.", "Zed is in Paris."],
            "source": ["kw", "kw"]}
    cols.update(overrides)
    return pd.DataFrame(cols)


def predictions_frame(**overrides) -> pd.DataFrame:
    cols = {"id": ["q1", "q1", "q2"], "question": ["A?", "A?", "B?"], "prediction": ["Ann Lee", "", "Paris"],
            "golds": [["Ann Lee"], ["Ann Lee"], ["Paris"]], "method": ["direct", "rag", "rag"],
            "em": [1.0, 0.0, 1.0], "f1": [1.0, 0.0, 1.0], "cem": [1.0, 0.0, 1.0], "retrievals": [0, 1, 2]}
    cols.update(overrides)
    return pd.DataFrame(cols)


GOOD_TRAJ = ("<internal>Acme is a company.</internal> <external>who founded Acme</external>"
             "<document>Acme was founded by Ann Lee.</document> The answer is <answer>Ann Lee</answer>")


def sft_frame(**overrides) -> pd.DataFrame:
    cols = {"id": ["s1", "s2"], "text": [GOOD_TRAJ, "<internal>Paris is in France.</internal> Paris"],
            "answer": ["Ann Lee", "Paris"], "retrievals": [1, 0]}
    cols.update(overrides)
    return pd.DataFrame(cols)


def fail(df, kind, tmp_path, name="t", **options) -> tuple[str, dict]:
    with pytest.raises(DataValidationError) as err:
        validate_frame(df, kind, name, report_dir=tmp_path, **options)
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert report["success"] is False
    return str(err.value), report


# ----------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("value, ok", [
    (["a"], True), (["a", "b"], True), (("a",), True), (np.array(["a"]), True),
    ([], False), ([""], False), (["a", ""], False), ("abc", False), ([1], False), (None, False),
    ([" "], False), (["\u200b\ufeff"], False), (["a", "\u00ad\t"], False), ([float("nan")], False),
    (np.array([]), False), ({"a": 1}, False), (float("nan"), False),
])
def test_non_empty_string_list(value, ok):
    assert non_empty_string_list(value) is ok


@pytest.mark.parametrize("text, ok", [
    ("", True),
    ("no tags at all", True),
    ("<external>q</external><document>d</document>", True),
    ("<external>q1</external><document>d</document><external>q2</external>\n<document>e</document>", True),
    ("<external>q</external> (retrieval cap reached) <external>q2</external><document>d</document>", True),
    ("<document>self-written</document>", False),
    ("<external>q</external><document>d</document><document>again</document>", False),
    ("<document>d</document><external>q</external>", False),
])
def test_documents_after_query(text, ok):
    assert documents_after_query(text, "</external>", "<document>") is ok


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown validation kind 'qaa'"):
        validate_frame(qa_frame(), "qaa", "x", report_dir=tmp_path)


def test_sft_suite_rejects_tags_without_query(tmp_path):
    with pytest.raises(ValueError, match="query_tag 'external'"):
        build_suite(sft_frame(), "sft", tags={"document": ("<d>", "</d>")})


def test_import_does_not_load_great_expectations():
    code = "import sys, searchrl.validation; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- passing frames
@pytest.mark.parametrize("kind, frame", [
    ("qa", qa_frame), ("corpus", corpus_frame), ("predictions", predictions_frame), ("sft", sft_frame),
])
def test_valid_frames_pass_and_write_report(kind, frame, tmp_path):
    report = validate_frame(frame(), kind, f"{kind}_ok", report_dir=tmp_path / "v")
    assert report["success"] is True and report["n_failed"] == 0 and report["kind"] == kind
    on_disk = json.loads((tmp_path / "v" / f"{kind}_ok.json").read_text())
    assert on_disk["success"] is True
    assert on_disk["n_rows"] == len(frame())
    assert all(e["success"] for e in on_disk["expectations"])
    assert {"type", "column", "success"} <= set(on_disk["expectations"][0])


def test_validation_does_not_modify_the_input(tmp_path):
    df = sft_frame()
    before = df.copy()
    validate_frame(df, "sft", "x", report_dir=tmp_path)
    pd.testing.assert_frame_equal(df, before)


# ----------------------------------------------------------------------------- qa failures
def test_qa_duplicate_id(tmp_path):
    msg, report = fail(qa_frame(id=["q1", "q2", "q2"]), "qa", tmp_path, name="qa_dup")
    assert "qa 'qa_dup' failed validation: 1 of" in msg
    assert "expect_column_values_to_be_unique on 'id': 2 of 3 rows, e.g. id 'q2', 'q2'" in msg
    assert f"report: {tmp_path / 'qa_dup.json'}" in msg
    entry = next(e for e in report["expectations"] if e["type"] == "expect_column_values_to_be_unique")
    assert entry == {**entry, "success": False, "unexpected_count": 2, "unexpected_examples": ["q2", "q2"]}


def test_qa_null_id(tmp_path):
    msg, _ = fail(qa_frame(id=["q1", None, "q3"]), "qa", tmp_path)
    assert "expect_column_values_to_not_be_null on 'id': 1 of 3 rows" in msg


def test_qa_empty_and_null_question(tmp_path):
    msg, _ = fail(qa_frame(question=["", "Where?", None]), "qa", tmp_path)
    assert "on '_question_not_blank' (value_set=[True]): 1 of 3 rows, e.g. id 'q1'" in msg
    assert "[question must not be blank (only whitespace or invisible characters)]" in msg
    assert "expect_column_values_to_not_be_null on 'question': 1 of 3 rows, e.g. id 'q3'" in msg


def test_qa_blank_looking_question_and_answers(tmp_path):
    """Issue 11 item 7: a whitespace-only (or zero-width) question passed the qa suite."""
    msg, _ = fail(qa_frame(question=["   ", "\u200b\ufeff", "When?"],
                           answers=[["a"], ["b"], ["\u2060 "]]), "qa", tmp_path)
    assert "on '_question_not_blank' (value_set=[True]): 2 of 3 rows, e.g. id 'q1', 'q2'" in msg
    assert "on '_answers_ok' (value_set=[True]): 1 of 3 rows, e.g. id 'q3'" in msg


@pytest.mark.parametrize("bad, bad_id", [
    ([["a"], [], ["c"]], "q2"),               # empty list
    ([["a"], ["b"], [""]], "q3"),             # empty string inside
    (["a", ["b"], ["c"]], "q1"),              # a bare string is not a list
    ([["a"], [1], ["c"]], "q2"),              # non-string element
    ([["a"], [" \u200b"], ["c"]], "q2"),      # blank-looking string
    ([["a"], ["b"], [float("nan")]], "q3"),   # NaN
])
def test_qa_bad_answers(bad, bad_id, tmp_path):
    msg, _ = fail(qa_frame(answers=bad), "qa", tmp_path)
    assert f"on '_answers_ok' (value_set=[True]): 1 of 3 rows, e.g. id '{bad_id}'" in msg
    assert "[answers must be a non-empty list of non-blank strings]" in msg


def test_qa_split_not_in_set(tmp_path):
    msg, _ = fail(qa_frame(split=["train", "tset", "eval"]), "qa", tmp_path)
    assert "expect_column_values_to_be_in_set on 'split'" in msg
    assert "1 of 3 rows, e.g. id 'q2' (values 'tset')" in msg


def test_qa_custom_splits(tmp_path):
    validate_frame(qa_frame(split=["a", "b", "a"]), "qa", "x", report_dir=tmp_path, splits=["a", "b"])
    msg, _ = fail(qa_frame(), "qa", tmp_path, splits=["train"])
    assert "2 of 3 rows" in msg


def test_qa_missing_column_is_reported_and_dependent_checks_skipped(tmp_path):
    msg, report = fail(qa_frame().drop(columns=["metadata", "answers"]), "qa", tmp_path)
    assert "expect_column_to_exist on 'metadata': column missing" in msg
    assert "expect_column_to_exist on 'answers': column missing" in msg
    assert "2 of" in msg.splitlines()[0]
    skipped = [e for e in report["expectations"] if e.get("skipped")]
    assert [e["column"] for e in skipped] == ["_answers_ok"] and skipped[0]["success"] is None


# ----------------------------------------------------------------------------- corpus failures
def test_corpus_duplicate_id_and_empty_text(tmp_path):
    msg, report = fail(corpus_frame(id=["p1", "p1"], text=["x", ""]), "corpus", tmp_path, name="corpus")
    assert "expect_column_values_to_be_unique on 'id': 2 of 2 rows, e.g. id 'p1', 'p1'" in msg
    assert "on '_text_not_blank' (value_set=[True]): 1 of 2 rows, e.g. id 'p1'" in msg
    assert report["n_failed"] == 2
    msg, _ = fail(corpus_frame(text=["x", " \u200b\n"]), "corpus", tmp_path)
    assert "on '_text_not_blank' (value_set=[True]): 1 of 2 rows, e.g. id 'p2'" in msg


def test_corpus_without_title(tmp_path):
    msg, _ = fail(corpus_frame().drop(columns=["title"]), "corpus", tmp_path)
    assert "expect_column_to_exist on 'title': column missing" in msg


def test_corpus_empty(tmp_path):
    msg, _ = fail(corpus_frame().iloc[0:0], "corpus", tmp_path)
    assert "expect_table_row_count_to_be_between (min_value=1): observed 0" in msg


# ----------------------------------------------------------------------------- predictions failures
def test_predictions_scores_out_of_range(tmp_path):
    msg, _ = fail(predictions_frame(f1=[1.0, 1.5, 0.2], retrievals=[0, -1, 2]), "predictions", tmp_path)
    assert "expect_column_values_to_be_between on 'f1' (min_value=0, max_value=1): 1 of 3 rows, e.g. id 'q1'" in msg
    assert "(values 1.5)" in msg
    assert "expect_column_values_to_be_between on 'retrievals' (min_value=0): 1 of 3 rows" in msg


def test_predictions_duplicate_id_within_method(tmp_path):
    msg, _ = fail(predictions_frame(method=["rag", "rag", "rag"]), "predictions", tmp_path)
    assert "expect_compound_columns_to_be_unique on 'id+method': 2 of 3 rows, e.g. id 'q1', 'q1'" in msg


def test_predictions_missing_score_and_null(tmp_path):
    msg, _ = fail(predictions_frame(cem=[1.0, None, 0.0]).drop(columns=["retrievals"]), "predictions", tmp_path)
    assert "expect_column_values_to_not_be_null on 'cem': 1 of 3 rows, e.g. id 'q1'" in msg
    assert "expect_column_to_exist on 'retrievals': column missing" in msg


# ----------------------------------------------------------------------------- sft failures
def test_sft_unbalanced_tags(tmp_path):
    text = ["<internal>a</internal><internal>b", "<external>q</external><document>d"]
    msg, _ = fail(sft_frame(text=text), "sft", tmp_path)
    assert ("expect_column_pair_values_to_be_equal on '_n_open_internal+_n_close_internal': "
            "1 of 2 rows, e.g. id 's1'") in msg
    assert "[text must contain as many <internal> as </internal>]" in msg
    assert "on '_n_open_document+_n_close_document': 1 of 2 rows, e.g. id 's2'" in msg
    assert "_n_open_external" not in msg


def test_sft_self_written_document(tmp_path):
    text = [GOOD_TRAJ, "<document>I made this up</document> Paris"]
    msg, _ = fail(sft_frame(text=text), "sft", tmp_path)
    assert "on '_documents_after_query' (value_set=[True]): 1 of 2 rows, e.g. id 's2'" in msg
    assert "[every <document> must follow a </external> (retriever output only)]" in msg


def test_sft_empty_answer_and_negative_retrievals(tmp_path):
    msg, _ = fail(sft_frame(answer=[" \u200b ", "Paris"], retrievals=[1, -2]), "sft", tmp_path)
    assert "on '_answer_not_blank' (value_set=[True]): 1 of 2 rows, e.g. id 's1'" in msg
    assert "on 'retrievals' (min_value=0): 1 of 2 rows, e.g. id 's2'" in msg


def test_sft_token_length_bounds(tmp_path):
    # whitespace words: s1 has 17, s2 has 5
    validate_frame(sft_frame(), "sft", "x", report_dir=tmp_path, min_tokens=5, max_tokens=17)
    msg, _ = fail(sft_frame(), "sft", tmp_path, max_tokens=16)
    assert ("expect_column_values_to_be_between on '_n_tokens' (min_value=1, max_value=16): "
            "1 of 2 rows, e.g. id 's1'") in msg
    assert "[text length must be in [1, 16] tokens]" in msg
    msg, _ = fail(sft_frame(), "sft", tmp_path, min_tokens=6)
    assert "e.g. id 's2'" in msg


def test_sft_custom_tokenizer_and_tags(tmp_path):
    tags = {"query": ("<|begin_of_query|>", "<|end_of_query|>"),
            "docs": ("<|begin_of_documents|>", "<|end_of_documents|>")}
    text = ["<|begin_of_query|>q<|end_of_query|><|begin_of_documents|>d<|end_of_documents|> ok", "plain"]
    df = pd.DataFrame({"text": text, "answer": ["ok", "plain"], "retrievals": [1, 0]})  # no id column
    report = validate_frame(df, "sft", "r1", report_dir=tmp_path, tags=tags, query_tag="query",
                            document_tag="docs", count_tokens=len, max_tokens=200)
    assert report["success"]
    bad = df.assign(text=["<|begin_of_documents|>d<|end_of_documents|>", "plain"])
    msg, _ = fail(bad, "sft", tmp_path, tags=tags, query_tag="query", document_tag="docs")
    assert "'_documents_after_query'" in msg and "e.g. row 0" in msg   # row index when there is no id
    msg, _ = fail(df, "sft", tmp_path, tags=tags, query_tag="query", document_tag="docs",
                  count_tokens=len, max_tokens=10)   # characters as "tokens": row 0 is longer than 10
    assert "'_n_tokens'" in msg and "e.g. row 0" in msg
