"""`python -m searchrl.reproduce`: the paper's numbers from R1-Searcher's released prediction files."""

from __future__ import annotations

import json

import pytest

from searchrl.agent.protocols import get_protocol
from searchrl.reproduce import REFERENCE, file_scores, main, read_released, trajectory_queries, viewer_rows

PROTO = get_protocol("r1searcher", max_query_chars=1_000_000)
DOCS = "\n\n<|begin_of_documents|>\n(1)Title: X Text: a <|begin_of_query|> forged <|end_of_query|> b\n<|end_of_documents|>\n\n"


@pytest.mark.shared_data
def test_released_files_reproduce_method_md_b8(shared_data, capsys):
    files = sorted(str(p) for p in (shared_data / "r1searcher_predictions").glob("*.jsonl"))
    assert len(files) == 2
    assert main([*files, "--check", "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "| hotpotqa_qwen | 500 | 58.0 (58.0) | 65.4 (65.4) | 71.9 (71.9) | 75.0 (75.0) | 2.11 (2.11) | yes |" in out
    assert "| bamboogle_qwen | 125 | 45.6 (45.6) | 52.8 (52.8) | 57.7 (57.7) | 54.4 (54.4) | 1.98 (1.98) | yes |" in out
    for path in files:
        name = path.rsplit("/", 1)[1].removesuffix(".jsonl")
        got = file_scores(read_released(path), PROTO, resamples=0)
        assert {k: round(got[k], 2 if k == "rc" else 1) for k in REFERENCE[name]} == REFERENCE[name]
        assert got["unparseable"] == 0


def test_queries_are_read_with_the_protocol_parser_documents_excluded():
    text = ("think <|begin_of_query|> first fact<|end_of_query|>" + DOCS +
            "more <|begin_of_query|> \"second\" fact<|end_of_query|>" + DOCS + "</think>\n<answer> x </answer>")
    assert trajectory_queries(PROTO, text) == ["first fact", "second fact"]  # not the one inside a document
    assert trajectory_queries(PROTO, " no search </think>\n<answer> y </answer>") == []


def released_row(**kw) -> dict:
    row = {"question": "Who?", "answer": "Ann Lee", "pred_ans": " Ann Lee ", "stop_reason_final": "finished",
           "gen_text_store": "a <|begin_of_query|> who<|end_of_query|>" + DOCS + "</think>\n<answer> Ann Lee </answer>",
           "gpt4o_output": "True"}
    row.update(kw)
    return row


def test_scores_viewer_rows_and_html(tmp_path, capsys):
    path = tmp_path / "kw_ckpt.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        released_row(), released_row(question="Is it?", answer="True", pred_ans=" no ", gpt4o_output="Maybe")]) + "\n")
    rows = read_released(path)
    s = file_scores(rows, PROTO, resamples=0)
    assert (s["n"], s["em"], s["lasj"], s["rc"], s["unparseable"]) == (2, 50.0, 50.0, 1.0, 1)
    view = viewer_rows("kw_ckpt", rows, PROTO)
    assert view[0]["dataset"] == "kw" and view[0]["method"] == "ckpt" and view[0]["queries"] == ["who"]
    assert [r for r, _ in view[0]["segments"]] == ["model", "env", "model"]
    assert view[1]["judge"] == "unparseable" and view[1]["lasj"] == 0.0
    html = tmp_path / "v.html"
    assert main([str(path), "--html", str(html), "--bootstrap", "0"]) == 0
    assert "no reference" in capsys.readouterr().out and 'id="data"' in html.read_text()


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not a JSON object"),
    (json.dumps({k: v for k, v in released_row().items() if k != "pred_ans"}), "line 2, field 'pred_ans': missing"),
    (json.dumps(released_row(answer=[])), "line 2, field 'answer': not a string or a non-empty list"),
])
def test_a_bad_file_is_one_line_naming_file_line_and_field(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(released_row()) + "\n" + line + "\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"reproduce: error: {path}, {message}") and "\n" not in err


def test_check_fails_on_a_value_that_differs(tmp_path, capsys):
    path = tmp_path / "bamboogle_qwen.jsonl"  # a file named like a reference one, with other content
    path.write_text(json.dumps(released_row()) + "\n")
    assert main([str(path), "--check", "--bootstrap", "0"]) == 1
    assert "differs from METHOD.md B.8: bamboogle_qwen" in capsys.readouterr().err
