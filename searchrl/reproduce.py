"""Reproduce a paper's table from released prediction files (R1-Searcher's `data/eval_results/` format).

    python -m searchrl.reproduce ../shared/data/r1searcher_predictions/*.jsonl [--check] [--bootstrap 1000]
                                 [--html released.html]

Each file holds one JSON object a line with `question`, `answer` (the gold: a string, or a list of
aliases), `pred_ans` (the raw text between the answer tags), `gen_text_store` (the whole trajectory in
R1-Searcher's tag format) and `gpt4o_output` (the GPT-4o-mini judge's reply). Per file it prints

    EM, CEM (= ACC_R), F1   `searchrl.metrics.score` on the raw pred_ans, aggregated as the reference's
                            metric_calc_rule.py does (first 2,000 rows, x100, one decimal; METHOD.md C)
    LasJ (= ACC_L)          the share of stored judge replies equal to "True" (METHOD.md C)
    RC                      queries per question, read from gen_text_store with our R1-Searcher
                            protocol parser (environment blocks recovered by `split_text`, each
                            query close tag parsed by `parse_segment`)

next to the reference values of METHOD.md B.8 for the files it lists (by file name), and a second
table with the 95% bootstrap intervals over questions (searchrl/intervals.py). `--check` exits 1
when a value differs from its reference (EM / CEM / F1 / LasJ to one decimal, RC to two).
`--html PATH` writes the trajectory viewer (searchrl/trajectory_view.py) over the files: a file
`<dataset>_<checkpoint>.jsonl` is that checkpoint's answers on that dataset, so two checkpoints'
files of one dataset (hotpotqa_qwen, hotpotqa_llama) can be compared question by question.

A bad file is one line naming the file, the line and the field, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from searchrl.errors import InputError, SearchRLError
from searchrl.intervals import bootstrap_mean
from searchrl.judge import parse_verdict
from searchrl.metrics import aggregate, score

FIELDS = ("question", "answer", "pred_ans", "gen_text_store", "gpt4o_output")
ROW_LIMIT = 2000  # the reference script averages at most the first 2,000 rows

# METHOD.md B.8: the released files rescored with the reference metric code (EM, CEM, F1 and LasJ in %,
# RC = mean number of queries); they match the R1-Searcher paper's Tables 2-4.
REFERENCE = {
    "hotpotqa_qwen": {"em": 58.0, "cem": 65.4, "f1": 71.9, "lasj": 75.0, "rc": 2.11},
    "hotpotqa_llama": {"em": 58.4, "cem": 64.8, "f1": 70.6, "lasj": 74.6, "rc": 2.80},
    "2wiki_qwen": {"em": 55.4, "cem": 63.6, "f1": 63.7, "lasj": 65.0, "rc": 2.24},
    "bamboogle_qwen": {"em": 45.6, "cem": 52.8, "f1": 57.7, "lasj": 54.4, "rc": 1.98},
    "bamboogle_llama": {"em": 44.0, "cem": 50.4, "f1": 57.1, "lasj": 54.4, "rc": 2.71},
}
COLUMNS = (("em", "EM", 1), ("cem", "CEM", 1), ("f1", "F1", 1), ("lasj", "LasJ", 1), ("rc", "RC", 2))


def read_released(path: str | Path) -> list[dict]:
    """The rows of one released file; InputError naming the file, line and field for a bad row."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except UnicodeDecodeError as err:
        raise InputError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, f"not a JSON object ({err.msg})", row=i) from None
        if not isinstance(row, dict):
            raise InputError(path, "not a JSON object", row=i)
        for name in FIELDS:
            if name not in row:
                raise InputError(path, "missing", row=i, field=name,
                                 fix=f"R1-Searcher's format has {', '.join(FIELDS)}")
        golds = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        if not golds or not all(isinstance(g, str) for g in golds):
            raise InputError(path, "not a string or a non-empty list of strings", row=i, field="answer")
        for name in ("question", "pred_ans", "gen_text_store"):
            if not isinstance(row[name], str):
                raise InputError(path, f"not a string ({type(row[name]).__name__})", row=i, field=name)
        rows.append({**row, "answer": golds, "gpt4o_output": "" if row["gpt4o_output"] is None
                     else str(row["gpt4o_output"])})
    if not rows:
        raise InputError(path, "no rows")
    return rows


def trajectory_queries(protocol, text: str) -> list[str]:
    """The queries a rendered trajectory issued, read with the protocol's own parser: the model's text
    (environment blocks removed by `protocol.split_text`) is cut after each query close tag and each
    piece parsed by `protocol.parse_segment`; every search action counts (an empty query too)."""
    model_text = "".join(t for role, t in protocol.split_text(text) if role == "model")
    queries, pos = [], 0
    while (j := model_text.find(protocol.query_close, pos)) >= 0:
        end = j + len(protocol.query_close)
        action = protocol.parse_segment(model_text[pos:end], protocol.query_close)
        if action.kind == "search":
            queries.append(action.query or "")
        pos = end
    return queries


def file_scores(rows: list[dict], protocol, resamples: int = 1000, seed: int = 0) -> dict:
    """{em, cem, f1, lasj, rc, n, unparseable, <key>_lo / <key>_hi} for one file's rows (see the module
    docstring)."""
    rows = rows[:ROW_LIMIT]
    per_row = [score(r["pred_ans"], r["answer"]) for r in rows]
    for s, r in zip(per_row, rows, strict=True):
        s["lasj"] = float(r["gpt4o_output"] == "True")  # the reference counts exactly "True"
        s["rc"] = float(len(trajectory_queries(protocol, r["gen_text_store"])))
    out: dict = aggregate(per_row)  # em / f1 / cem x100 and n, the reference's aggregation
    out["lasj"] = 100.0 * sum(s["lasj"] for s in per_row) / len(per_row)
    out["rc"] = sum(s["rc"] for s in per_row) / len(per_row)
    out["unparseable"] = sum(parse_verdict(r["gpt4o_output"]) is None for r in rows)
    for key, _, _ in COLUMNS:
        scale = 1.0 if key == "rc" else 100.0
        _, lo, hi = bootstrap_mean([scale * s[key] for s in per_row], resamples, seed)
        if lo is not None:
            out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
    return out


def viewer_rows(name: str, rows: list[dict], protocol) -> list[dict]:
    """Prediction rows for the trajectory viewer from one released file named `<dataset>_<checkpoint>`:
    the trajectory split into model text and inserted documents by the protocol, its queries, the
    scores, the stored judge verdict and finish reason. Questions are keyed by their text, so the same
    question in two checkpoints' files lines up."""
    import hashlib

    dataset, _, checkpoint = name.rpartition("_") if "_" in name else (name, "", "released")
    out = []
    for r in rows:
        verdict = parse_verdict(r["gpt4o_output"])
        out.append({"id": hashlib.sha256(r["question"].encode("utf-8")).hexdigest()[:12], "dataset": dataset,
                    "method": checkpoint, "question": r["question"], "golds": r["answer"],
                    "prediction": r["pred_ans"], **score(r["pred_ans"], r["answer"]),
                    "lasj": float(r["gpt4o_output"] == "True"),
                    "judge": "unparseable" if verdict is None else str(verdict), "judge_reply": r["gpt4o_output"],
                    "queries": trajectory_queries(protocol, r["gen_text_store"]),
                    "retrievals": len(trajectory_queries(protocol, r["gen_text_store"])),
                    "finish_reason": str(r.get("stop_reason_final", "")),
                    "segments": [[role, text] for role, text in protocol.split_text(r["gen_text_store"])]})
    return out


def matches(ours: dict, ref: dict) -> dict[str, bool]:
    """Per column: our value equals the reference at the reference's precision."""
    return {key: round(ours[key], digits) == round(ref[key], digits) for key, _, digits in COLUMNS if key in ref}


def render(results: dict[str, dict]) -> str:
    """The paper-style table (ours, reference in parentheses, a check mark when equal) and the intervals."""
    head = "| file | n | " + " | ".join(label for _, label, _ in COLUMNS) + " | matches METHOD.md |"
    lines = ["Released predictions rescored (ours (METHOD.md B.8)):", "", head,
             "|---|---:|" + "---:|" * len(COLUMNS) + "---|"]
    for name, r in results.items():
        ref = REFERENCE.get(name, {})
        ok = matches(r, ref) if ref else {}
        cells = []
        for key, _, digits in COLUMNS:
            cell = f"{r[key]:.{digits}f}"
            if key in ref:
                cell += f" ({ref[key]:.{digits}f})" + ("" if ok[key] else " ≠")
            cells.append(cell)
        verdict = ("yes" if all(ok.values()) else "NO: " + ", ".join(k for k, v in ok.items() if not v)) if ref \
            else "no reference"
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "95% bootstrap intervals over questions:", "",
              "| file | " + " | ".join(label for _, label, _ in COLUMNS) + " | judge replies neither True nor False |",
              "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, r in results.items():
        cells = [f"[{r[f'{k}_lo']:.{d}f}, {r[f'{k}_hi']:.{d}f}]" if f"{k}_lo" in r else "–" for k, _, d in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['unparseable']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m searchrl.reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="released prediction files (JSON lines)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a value differs from its METHOD.md reference")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument("--html", metavar="PATH", help="also write the trajectory viewer of the files here")
    args = parser.parse_args(argv)
    from searchrl.agent.protocols import get_protocol

    protocol = get_protocol("r1searcher", max_query_chars=1_000_000)  # count queries, never cut them
    try:
        released = {Path(f).name.removesuffix(".jsonl"): read_released(f) for f in args.files}
    except SearchRLError as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2
    results = {name: file_scores(rows, protocol, args.bootstrap, args.seed) for name, rows in released.items()}
    print(render(results))
    if args.html:
        from searchrl.trajectory_view import write_trajectories_html

        page = write_trajectories_html((r for name, rows in released.items() for r in viewer_rows(name, rows, protocol)),
                                       args.html, title="released predictions")
        print(f"\ntrajectory viewer: {page}")
    if args.check:
        bad = [n for n, r in results.items() if n in REFERENCE and not all(matches(r, REFERENCE[n]).values())]
        if bad:
            print(f"\nreproduce: differs from METHOD.md B.8: {', '.join(bad)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
