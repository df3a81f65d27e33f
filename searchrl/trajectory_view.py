"""reports/eval/trajectories.html: a static, self-contained page to browse the evaluation per question.

For each question it shows the gold answer(s) and, for a method A and optionally a method B side by
side (methods, checkpoints or ablations evaluated on the same questions), the trajectory: the model's
text and the documents the environment inserted, visibly distinct (inserted blocks are framed and
labelled), the queries, the answer, EM / F1 / CEM / LasJ with the judge's verdict, the retrieval count
and the finish reason; below, a word-level diff of the two model texts (inserted documents left out).
A question list on the left filters by text, dataset, and "A and B disagree" (F1 or LasJ differ).
With several samples per question (`evaluate.samples`, `evaluate.seeds`) a sample can be chosen.
The URL fragment keeps the view (#q=<index>&a=<method>&b=<method>&s=<sample>), so a link shows
the same comparison.

Untrusted text (questions, answers, retrieved passages, model output) is never parsed as HTML: the
data travel as JSON inside `<script type="application/json">` with `<`, `>`, `&` and the two JS line
separators escaped as \\uXXXX (so no text can close the element), and the page script puts every
string into the document with `textContent` only. A Content-Security-Policy allows no network access
and runs only the page's own script and style (by their sha256), a second line of defence.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

SCORE_KEYS = ("em", "f1", "cem", "lasj")
ROW_KEYS = ("prediction", "finish_reason", "retrievals", "internal_steps", "format_valid", "judge", "judge_reply",
            "queries", "segments", "sample", "seed", *SCORE_KEYS)


def script_json(obj) -> str:
    """JSON safe inside a <script> element: `<`, `>`, `&`, U+2028 and U+2029 as \\uXXXX escapes."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _clean(value):
    """A JSON-safe value: NaN / missing as None, numpy scalars and arrays as Python values."""
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and value != value:  # NaN
        return None
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def viewer_data(rows: Iterable[Mapping], methods: list[str] | None = None, max_samples: int = 8) -> dict:
    """The page's data from prediction rows (`evaluation.Prediction.row()` dicts, or the records of
    reports/eval/predictions/*.jsonl): questions in first-seen order keyed by (dataset, id), and per
    question {method: [sample rows]} with at most `max_samples` samples each."""
    questions: list[dict] = []
    index: dict[tuple[str, str], int] = {}
    by_q: list[dict[str, list[dict]]] = []
    seen_methods: list[str] = []
    for r in rows:
        key = (str(r.get("dataset", "")), str(r["id"]))
        if key not in index:
            index[key] = len(questions)
            questions.append({"id": key[1], "dataset": key[0], "question": str(r.get("question", "")),
                              "golds": [str(g) for g in (_clean(r.get("golds")) or [])]})
            by_q.append({})
        method = str(r["method"])
        if method not in seen_methods:
            seen_methods.append(method)
        samples = by_q[index[key]].setdefault(method, [])
        if len(samples) < max_samples:
            samples.append({k: _clean(r.get(k)) for k in ROW_KEYS if k in r})
    order = [m for m in (methods or []) if m in seen_methods] + [m for m in seen_methods if m not in (methods or [])]
    return {"methods": order, "questions": questions, "rows": by_q}


STYLE = """
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; background: #f4f5f8; }
header { padding: 8px 14px; background: #1d2330; color: #fff; display: flex; gap: 14px; align-items: center; flex-wrap: wrap; }
header h1 { font-size: 16px; margin: 0 10px 0 0; }
header label { font-size: 13px; }
select, input { font: inherit; padding: 2px 4px; }
#wrap { display: flex; height: calc(100vh - 46px); }
#side { width: 300px; min-width: 220px; border-right: 1px solid #cfd3dc; display: flex; flex-direction: column; background: #fff; }
#filters { padding: 8px; border-bottom: 1px solid #e1e4ea; display: flex; flex-direction: column; gap: 6px; }
#count { font-size: 12px; color: #5b6475; }
#qlist { overflow-y: auto; flex: 1; margin: 0; padding: 0; list-style: none; }
#qlist li { padding: 6px 8px; border-bottom: 1px solid #eef0f4; cursor: pointer; font-size: 13px; }
#qlist li:hover { background: #eef3ff; }
#qlist li.sel { background: #dce6ff; }
#qlist .ds { color: #6b7385; font-size: 11px; margin-right: 4px; }
.mark { display: inline-block; width: 1.1em; text-align: center; font-weight: 700; }
.ok { color: #137333; } .bad { color: #b3261e; }
#main { flex: 1; overflow-y: auto; padding: 14px 18px; }
#qhead { background: #fff; border: 1px solid #cfd3dc; border-radius: 6px; padding: 10px 14px; margin-bottom: 12px; }
#qhead .q { font-size: 16px; font-weight: 600; }
#qhead .gold { margin-top: 4px; }
#cols { display: flex; gap: 12px; align-items: flex-start; }
.col { flex: 1; min-width: 0; background: #fff; border: 1px solid #cfd3dc; border-radius: 6px; padding: 10px 12px; }
.col h2 { font-size: 15px; margin: 0 0 6px; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; font-size: 13px; margin-bottom: 8px; }
.facts .k { color: #5b6475; }
.answer { font-weight: 700; background: #fff5cc; padding: 0 4px; border-radius: 3px; white-space: pre-wrap; }
.queries { margin: 0 0 8px 18px; padding: 0; font-size: 13px; }
.queries li { font-family: ui-monospace, Menlo, Consolas, monospace; }
.traj { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
.seg { white-space: pre-wrap; word-break: break-word; margin: 0; }
.seg.model { padding: 2px 0; }
.seg.env { background: #eef1f6; border-left: 4px solid #7a8aa8; color: #3d4658; padding: 4px 8px; margin: 4px 0; border-radius: 3px; max-height: 260px; overflow-y: auto; }
.seg.env::before { content: "inserted by the environment (retrieved documents)"; display: block; font: italic 11px system-ui, sans-serif; color: #6b7385; margin-bottom: 2px; }
#diff { background: #fff; border: 1px solid #cfd3dc; border-radius: 6px; padding: 10px 12px; margin-top: 12px; }
#diff h2 { font-size: 15px; margin: 0 0 6px; }
#diff .body { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
ins { background: #d2f4d8; text-decoration: none; }
del { background: #ffd7d5; }
.legend { font-size: 12px; color: #5b6475; margin-bottom: 6px; }
.empty { color: #6b7385; font-style: italic; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("data").textContent);
  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  const state = { q: 0, a: DATA.methods[0] || "", b: DATA.methods[1] || "", s: 0 };
  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.has("q")) state.q = Math.max(0, Math.min(DATA.questions.length - 1, parseInt(p.get("q"), 10) || 0));
    if (p.has("a") && DATA.methods.includes(p.get("a"))) state.a = p.get("a");
    if (p.has("b") && (p.get("b") === "" || DATA.methods.includes(p.get("b")))) state.b = p.get("b");
    if (p.has("s")) state.s = Math.max(0, parseInt(p.get("s"), 10) || 0);
  }
  function writeHash() {
    const p = new URLSearchParams({ q: state.q, a: state.a, b: state.b, s: state.s });
    history.replaceState(null, "", "#" + p.toString());
  }
  function sampleOf(qi, method) {
    const rows = (DATA.rows[qi] || {})[method] || [];
    return rows.length ? rows[Math.min(state.s, rows.length - 1)] : null;
  }
  function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(0); }
  function correct(r) { return r && (r.lasj !== undefined && r.lasj !== null ? r.lasj : r.cem) > 0; }

  function fillSelect(sel, options, value, withNone) {
    sel.replaceChildren();
    if (withNone) sel.appendChild(new Option("(none)", ""));
    for (const o of options) sel.appendChild(new Option(o, o));
    sel.value = value;
  }
  const datasets = Array.from(new Set(DATA.questions.map((q) => q.dataset)));
  fillSelect($("dataset"), datasets, "", false);
  $("dataset").insertBefore(new Option("all datasets", ""), $("dataset").firstChild);
  $("dataset").value = "";

  function differs(qi) {
    const a = sampleOf(qi, state.a), b = sampleOf(qi, state.b);
    if (!a || !b) return false;
    return a.f1 !== b.f1 || (a.lasj !== undefined && a.lasj !== b.lasj);
  }
  function renderList() {
    const text = $("filter").value.trim().toLowerCase();
    const ds = $("dataset").value, onlyDiff = $("onlydiff").checked;
    const list = $("qlist");
    list.replaceChildren();
    let shown = 0, matched = 0, selected = null;
    DATA.questions.forEach((q, qi) => {
      if (ds && q.dataset !== ds) return;
      if (text && !(q.question.toLowerCase().includes(text) || q.id.toLowerCase().includes(text))) return;
      if (onlyDiff && !differs(qi)) return;
      matched++;
      if (shown >= 1000) return;
      shown++;
      const li = el("li", qi === state.q ? "sel" : "");
      const a = sampleOf(qi, state.a), b = state.b ? sampleOf(qi, state.b) : null;
      li.appendChild(el("span", "mark " + (correct(a) ? "ok" : "bad"), a ? (correct(a) ? "✓" : "✗") : "·"));
      if (state.b) li.appendChild(el("span", "mark " + (correct(b) ? "ok" : "bad"), b ? (correct(b) ? "✓" : "✗") : "·"));
      li.appendChild(el("span", "ds", q.dataset));
      li.appendChild(document.createTextNode(q.question));
      li.addEventListener("click", () => { state.q = qi; update(); });
      list.appendChild(li);
      if (qi === state.q) selected = li;
    });
    if (selected) selected.scrollIntoView({ block: "nearest" });
    $("count").textContent = matched + " of " + DATA.questions.length + " questions" +
      (matched > shown ? " (first " + shown + " listed)" : "");
  }
  function fact(grid, k, v, cls) {
    grid.appendChild(el("span", "k", k));
    grid.appendChild(el("span", cls || "", v));
  }
  function renderCol(method, r) {
    const col = el("div", "col");
    col.appendChild(el("h2", "", method));
    if (!r) { col.appendChild(el("p", "empty", "no prediction of this method for this question")); return col; }
    const grid = el("div", "facts");
    fact(grid, "answer", r.prediction, "answer");
    fact(grid, "EM / F1 / CEM", pct(r.em) + " / " + pct(r.f1) + " / " + pct(r.cem));
    if (r.judge !== undefined && r.judge !== null) fact(grid, "LasJ (judge)", r.judge + (r.judge_reply && r.judge_reply !== r.judge ? "  (reply: " + r.judge_reply + ")" : ""));
    fact(grid, "retrievals", r.retrievals);
    if (r.internal_steps) fact(grid, "internal steps", r.internal_steps);
    fact(grid, "finish", r.finish_reason + (r.format_valid === false ? " (format invalid)" : ""));
    if (r.seed !== undefined && r.seed !== null) fact(grid, "sample / seed", r.sample + " / " + r.seed);
    col.appendChild(grid);
    if (r.queries && r.queries.length) {
      col.appendChild(el("div", "k", "queries"));
      const ol = el("ol", "queries");
      for (const q of r.queries) ol.appendChild(el("li", "", q));
      col.appendChild(ol);
    }
    const traj = el("div", "traj");
    const segs = r.segments || [];
    if (!segs.length) traj.appendChild(el("p", "empty", "no trajectory recorded"));
    for (const seg of segs) traj.appendChild(el("pre", "seg " + (seg[0] === "env" ? "env" : "model"), seg[1]));
    col.appendChild(traj);
    return col;
  }
  function tokens(text) { return text.match(/\s+|[^\s]+/g) || []; }
  function diffTokens(a, b) {
    // LCS table over word tokens; lines instead when the table would be too large
    if ((a.length + 1) * (b.length + 1) > 6e6) {
      a = a.join("").split(/(?<=\n)/); b = b.join("").split(/(?<=\n)/);
      if ((a.length + 1) * (b.length + 1) > 6e6) return null;
    }
    const n = a.length, m = b.length, w = m + 1, t = new Uint32Array((n + 1) * w);
    for (let i = n - 1; i >= 0; i--)
      for (let j = m - 1; j >= 0; j--)
        t[i * w + j] = a[i] === b[j] ? t[(i + 1) * w + j + 1] + 1 : Math.max(t[(i + 1) * w + j], t[i * w + j + 1]);
    const out = [];
    let i = 0, j = 0;
    const push = (kind, s) => { if (out.length && out[out.length - 1][0] === kind) out[out.length - 1][1] += s; else out.push([kind, s]); };
    while (i < n && j < m) {
      if (a[i] === b[j]) { push("=", a[i]); i++; j++; }
      else if (t[(i + 1) * w + j] >= t[i * w + j + 1]) { push("-", a[i]); i++; }
      else { push("+", b[j]); j++; }
    }
    while (i < n) push("-", a[i++]);
    while (j < m) push("+", b[j++]);
    return out;
  }
  function modelText(r) { return (r && r.segments ? r.segments.filter((s) => s[0] !== "env").map((s) => s[1]).join("") : ""); }
  function renderDiff(a, b) {
    const box = $("diff");
    box.replaceChildren();
    if (!state.b) { box.hidden = true; return; }
    box.hidden = false;
    box.appendChild(el("h2", "", "Diff of the model text: " + state.a + " → " + state.b));
    box.appendChild(el("div", "legend", "red: only in " + state.a + " · green: only in " + state.b + " · inserted documents left out"));
    const body = el("div", "body");
    const parts = diffTokens(tokens(modelText(a)), tokens(modelText(b)));
    if (parts === null) body.appendChild(el("p", "empty", "texts too long to diff here"));
    else for (const [kind, s] of parts) body.appendChild(kind === "=" ? document.createTextNode(s) : el(kind === "+" ? "ins" : "del", "", s));
    box.appendChild(body);
  }
  function update() {
    const q = DATA.questions[state.q];
    const head = $("qhead");
    head.replaceChildren();
    if (!q) { head.appendChild(el("p", "empty", "no questions")); return; }
    head.appendChild(el("div", "q", q.question));
    const gold = el("div", "gold");
    gold.appendChild(el("span", "k", "gold: "));
    gold.appendChild(el("span", "answer", q.golds.join("  |  ")));
    gold.appendChild(el("span", "k", "   " + q.dataset + " · " + q.id));
    head.appendChild(gold);
    const nSamples = Math.max(1, ...DATA.methods.map((m) => ((DATA.rows[state.q] || {})[m] || []).length));
    fillSelect($("sample"), Array.from({ length: nSamples }, (_, i) => String(i)), String(Math.min(state.s, nSamples - 1)), false);
    const a = sampleOf(state.q, state.a), b = state.b ? sampleOf(state.q, state.b) : null;
    const cols = $("cols");
    cols.replaceChildren(renderCol(state.a, a));
    if (state.b) cols.appendChild(renderCol(state.b, b));
    renderDiff(a, b);
    writeHash();
    renderList();
  }
  readHash();
  fillSelect($("ma"), DATA.methods, state.a, false);
  fillSelect($("mb"), DATA.methods, state.b, true);
  $("ma").addEventListener("change", (e) => { state.a = e.target.value; update(); });
  $("mb").addEventListener("change", (e) => { state.b = e.target.value; update(); });
  $("sample").addEventListener("change", (e) => { state.s = parseInt(e.target.value, 10) || 0; update(); });
  for (const id of ["filter", "dataset", "onlydiff"]) $(id).addEventListener("input", renderList);
  window.addEventListener("hashchange", () => { readHash(); update(); });
  update();
})();
"""

BODY = """<header><h1>{title}</h1>
<label>method A <select id="ma"></select></label>
<label>method B <select id="mb"></select></label>
<label>sample <select id="sample"></select></label></header>
<div id="wrap"><nav id="side"><div id="filters">
<input id="filter" type="search" placeholder="filter questions">
<select id="dataset"></select>
<label><input id="onlydiff" type="checkbox"> only where A and B differ</label>
<span id="count"></span></div><ul id="qlist"></ul></nav>
<main id="main"><section id="qhead"></section><section id="cols"></section><section id="diff" hidden></section></main></div>"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def render_html(data: dict, title: str = "searchrl trajectories") -> str:
    """The whole page for `viewer_data(...)`."""
    csp = (f"default-src 'none'; script-src '{_sha256(SCRIPT)}'; style-src '{_sha256(STYLE)}'; "
           "img-src 'none'; connect-src 'none'; form-action 'none'; base-uri 'none'")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style></head>\n<body>\n"
            f"{BODY.format(title=html.escape(title))}\n"
            f"<script type=\"application/json\" id=\"data\">{script_json(data)}</script>\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")


def write_trajectories_html(rows: Iterable[Mapping], out: str | os.PathLike, methods: list[str] | None = None,
                            title: str = "searchrl trajectories", max_samples: int = 8) -> Path:
    """Write the page for prediction rows (see `viewer_data`) to `out`; returns its path."""
    from searchrl.io import atomic_path

    out = Path(out)
    page = render_html(viewer_data(rows, methods, max_samples), title)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
