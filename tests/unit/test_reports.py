"""The evaluation reports: table.md in the R1-Searcher++ Table 1 layout, the paired-comparison table,
the F1-vs-RC plot, and the trajectory viewer (escaping of untrusted text, its data, a real browser)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from searchrl import reports
from searchrl.trajectory_view import SCRIPT, render_html, script_json, viewer_data, write_trajectories_html

METRICS = {
    "bamboogle": {"rl": {"f1": 60.8, "lasj": 59.2, "retrievals": 1.74, "f1_lo": 52.0, "f1_hi": 68.0,
                         "retrievals_lo": 1.6, "retrievals_hi": 1.9, "n": 125},
                  "direct": {"f1": 18.2, "retrievals": 0.0, "n": 125}},
    "hotpotqa": {"rl": {"f1": 59.0, "lasj": 64.2, "retrievals": 1.44, "n": 500},
                 "direct": {"f1": 26.0, "retrievals": 0.0, "n": 500}},
    "all": {"rl": {"f1": 59.3, "retrievals": 1.5, "n": 625}},
    "kw_seen": {"rl_closed_book": {"f1": 10.0, "retrievals": 0.0, "n": 8}},
}


def test_table1_layout_datasets_in_paper_order_with_averages():
    table = reports.table1(METRICS, order=["direct", "rl"]).splitlines()
    assert table[0] == ("| Method | hotpotqa F1 | hotpotqa LasJ | hotpotqa RC | bamboogle F1 | bamboogle LasJ | "
                        "bamboogle RC | Avg F1 | Avg LasJ | Avg RC |")
    assert table[2] == "| direct | 26.0 | – | 0.00 | 18.2 | – | 0.00 | 22.1 | – | 0.00 |"
    assert table[3] == "| rl | 59.0 | 64.2 | 1.44 | 60.8 | 59.2 | 1.74 | 59.9 | 61.7 | 1.59 |"
    assert len(table) == 4  # no row for the closed-book memorization method, no 'all' columns


def test_report_markdown_has_the_three_parts():
    paired = {"hotpotqa": {"rl - direct": {"f1": 33.0, "f1_lo": 28.0, "f1_hi": 38.0, "retrievals": 1.44, "n": 500}},
              "bamboogle": {"rl - direct": {"f1": 2.0, "f1_lo": -3.0, "f1_hi": 7.0, "n": 125}}}
    text = reports.report_markdown(METRICS, paired, ["direct", "rl"],
                                   {"model": "gpt-4o-mini", "backend": "openai", "prompt_version": "v", "judged": 9,
                                    "unparseable": 1})
    assert "## Main table" in text and "## All metrics" in text and "## Paired comparisons" in text
    assert "| hotpotqa | rl - direct | 500 | +33.0 [+28.0, +38.0]* | +1.44 |" in text
    assert "| bamboogle | rl - direct | 125 | +2.0 [-3.0, +7.0] | – |" in text  # includes 0: no star
    assert "1 of 9 predictions got a reply neither True nor False" in text
    assert "60.8 [52.0, 68.0]" in text  # the interval in the full table


def test_f1_vs_rc_plot_is_a_png(tmp_path):
    out = reports.plot_f1_vs_rc(METRICS, tmp_path / "f1_vs_rc.png", ["direct", "rl"])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = reports.plot_f1_vs_rc({}, tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- trajectory viewer
EVIL = '</script><img src=x onerror="alert(1)"><b>&amp;</b>\u2028'


def rows():
    base = {"dataset": "hotpotqa", "golds": ["Paris"], "em": 1.0, "f1": 1.0, "cem": 1.0, "retrievals": 1,
            "finish_reason": "answered", "sample": 0, "seed": 0}
    return [
        {**base, "id": "q1", "method": "rl", "question": f"Where? {EVIL}", "prediction": "Paris",
         "queries": [f"capital {EVIL}"], "lasj": 1.0, "judge": "True",
         "segments": [["model", "<external>capital</external>"], ["env", f"\n<document>\n(1) {EVIL}\n</document>\n"],
                      ["model", "<answer>Paris</answer>"]]},
        {**base, "id": "q1", "method": "direct", "question": f"Where? {EVIL}", "prediction": "Lyon", "em": 0.0,
         "f1": 0.0, "cem": 0.0, "retrievals": 0, "segments": [["model", "Lyon"]], "queries": []},
        {**base, "id": "q2", "method": "rl", "question": "Second?", "prediction": "x", "segments": [],
         "golds": ["x"], "sample": 1, "f1": float("nan")},
    ]


def test_viewer_data_groups_by_question_and_method():
    data = viewer_data(rows(), methods=["direct", "rl"])
    assert data["methods"] == ["direct", "rl"]
    assert [q["id"] for q in data["questions"]] == ["q1", "q2"]
    assert set(data["rows"][0]) == {"rl", "direct"} and data["rows"][1]["rl"][0]["f1"] is None  # NaN -> null
    assert data["rows"][0]["rl"][0]["segments"][1][0] == "env"


def test_untrusted_text_cannot_leave_the_data_element():
    page = render_html(viewer_data(rows()))
    assert "<img" not in page and "onerror=\"alert" not in page and "\u2028" not in page
    assert page.count("</script>") == 2  # the data element's and the page script's own
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(blob)["questions"][0]["question"] == f"Where? {EVIL}"  # exact text round trip
    assert script_json("<>&") == '"\\u003c\\u003e\\u0026"'
    # the Content-Security-Policy admits exactly the page's own script
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page and "default-src 'none'" in page
    # the page script never parses text as HTML
    assert "innerHTML" not in SCRIPT and "insertAdjacentHTML" not in SCRIPT and "document.write" not in SCRIPT


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None and os.environ.get("SEARCHRL_REQUIRE_BROWSER") != "1",
                    reason="no Chromium on this machine (apt-get install chromium)")
def test_viewer_renders_in_a_headless_browser_with_text_kept_as_text(tmp_path):
    """The page's script runs in a real browser: the DOM after it holds the trajectories, the inserted
    documents as their own blocks, the hostile text as text (no <img> element was created)."""
    page = write_trajectories_html(rows(), tmp_path / "trajectories.html", methods=["rl", "direct"])
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000",
                          "--dump-dom", page.resolve().as_uri() + "#q=0&a=rl&b=direct&s=0"],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert 'class="seg env"' in dom, (out.stderr[-2000:], dom[:2000])
    assert dom.count('class="seg model"') == 3  # rl: two model segments; direct: one
    assert "&lt;img src=x onerror=" in dom and "<img" not in dom
    assert '<h2>Diff of the model text: rl → direct</h2>' in dom and "<del>" in dom and "<ins>" in dom
    assert "2 of 2 questions" in dom
