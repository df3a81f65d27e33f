"""How often the evidence oracle's queries bring the gold paragraph back, on real data.

    python bench/bench_evidence_oracle.py            # BM25 (full corpus and IRCoT contexts) + dense (contexts)
    python bench/bench_evidence_oracle.py --no-dense # BM25 only (seconds instead of minutes)

Data: configs/hotpotqa_local.yaml's prepare stage, run here into a temp dir: the IRCoT HotpotQA 500
(2 gold paragraphs each) and the MuSiQue-Ans dev questions (2-4 gold paragraphs each; about half of
them have every gold paragraph in this corpus), over the 54,764 de-duplicated local paragraphs. Every
index is built here, from exactly the passages reported:

    bm25_full      BM25 over the whole hotpotqa_local corpus
    bm25_contexts  BM25 over the 4,858 paragraphs of the IRCoT 500's distractor contexts
    dense_contexts the preset's dense encoder (all-MiniLM-L6-v2, Flat) over the same 4,858 (a dense
                   index of the whole corpus takes ~45 minutes on a 2-core CPU)

Per index, for the IRCoT HotpotQA 500 (MuSiQue on bm25_full): `wordings`, the share of gold paragraphs
each query wording alone brings back in the top k (searchrl/training/evidence.py) and the share the
oracle's "first wording that works" gets; then the oracle sampler itself under the preset's agent
settings (`sampling.run_sampling(["oracle"])`): acceptance, the pass rate of each filter and
`gold_recall` (the share of inserted document blocks that hold their gold paragraph).
Results: bench/results/evidence_oracle.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_index import loadavg, machine  # noqa: E402

from searchrl.agent.protocols import get_protocol  # noqa: E402
from searchrl.config import IndexCfg, load_params  # noqa: E402
from searchrl.data.prepare import passage_key, prepare_data  # noqa: E402
from searchrl.data.schema import Passage  # noqa: E402
from searchrl.models import load_tokenizer  # noqa: E402
from searchrl.retrieval.index import build_index, load_index  # noqa: E402
from searchrl.training import sampling  # noqa: E402
from searchrl.training.evidence import evidence_steps, title_matches  # noqa: E402

PRESET = "configs/hotpotqa_local.yaml"


def wording_recall(records, retriever, protocol, k: int) -> dict:
    """Share of gold paragraphs in the top k: per wording position, the first wording that works,
    and the whole question as the query (a baseline)."""
    steps = [(r, s) for r in records for s in evidence_steps(r.question, r.answers, r.metadata)]
    wordings = {q for _, s in steps for q in s.queries} | {r.question for r, _ in steps}
    queries = sorted({protocol.clean_query(q) for q in wordings})
    hits = dict(zip(queries, retriever.search(queries, k), strict=True))

    def found(query: str, title: str) -> bool:
        return any(title_matches(h.title, title) for h in hits[protocol.clean_query(query)])

    n_pos = max(len(s.queries) for _, s in steps)
    by_pos = [[found(s.queries[i], s.title) for _, s in steps if i < len(s.queries)] for i in range(n_pos)]
    first = [any(found(q, s.title) for q in s.queries) for _, s in steps]
    whole = [found(r.question, s.title) for r, s in steps]
    return {"gold_paragraphs": len(steps),
            "wording": [{"position": i, "n": len(v), "recall": round(sum(v) / len(v), 4)} for i, v in enumerate(by_pos)],
            "first_that_works": round(sum(first) / len(first), 4), "whole_question": round(sum(whole) / len(whole), 4)}


def oracle_stats(records, retriever, protocol, params, tok) -> dict:
    t0 = time.perf_counter()
    res = sampling.run_sampling(records, ["oracle"], None, retriever, protocol, params.agent, n_samples=1,
                                temperature=0.0, keep_per_question=1, oracle_variants=1, oracle_tokenizer=tok)
    st = res.stats["samplers"]["oracle"]
    return {"questions": len(records), "seconds": round(time.perf_counter() - t0, 1),
            **{k: st[k] for k in ("candidates", "accepted", "acceptance", "pass_rate", "evidence", "finish",
                                  "top_rejections")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-dense", action="store_true", help="skip the dense index (minutes on a CPU)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "evidence_oracle.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    params = load_params(ROOT / "params.yaml", preset=ROOT / PRESET)
    data = prepare_data(params)
    protocol = get_protocol(params.agent.protocol, params.agent, max_answer_words=params.sample.max_answer_words)
    tok = load_tokenizer(params.policy.model)
    contexts = set()
    for line in (ROOT / params.prepare.jsonl.eval[0].path).read_text(encoding="utf-8").splitlines():
        for c in json.loads(line)["contexts"]:
            contexts.add(passage_key(Passage("", c["title"], c["paragraph_text"].strip())))
    corpora = {"bm25_full": ("bm25", data.corpus),
               "bm25_contexts": ("bm25", [p for p in data.corpus if passage_key(p) in contexts])}
    if not args.no_dense:
        corpora["dense_contexts"] = ("dense", corpora["bm25_contexts"][1])

    out: dict = {"benchmark": "evidence oracle: gold-paragraph recall of its queries and its acceptance, real data",
                 "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "preset": PRESET,
                 "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                 "agent": {k: getattr(params.agent, k) for k in ("top_k", "max_passage_words", "max_segment_tokens",
                                                                 "max_total_tokens")},
                 "indexes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, passages) in corpora.items():
            cfg = IndexCfg(kind=kind, device="cpu", work_dir=str(Path(tmp) / f"{name}.work"))
            t0, la0 = time.perf_counter(), loadavg()
            build_index(passages, cfg, Path(tmp) / name)
            build_s = round(time.perf_counter() - t0, 1)
            retriever = load_index(Path(tmp) / name)
            entry = {"kind": kind, "passages": len(passages), "build_seconds": build_s, "loadavg_before": la0,
                     "hotpotqa_ircot500": {"wordings": wording_recall(data.eval, retriever, protocol,
                                                                      params.agent.top_k),
                                           "oracle": oracle_stats(data.eval, retriever, protocol, params, tok)}}
            if name == "bm25_full":
                entry["musique_dev"] = {"wordings": wording_recall(data.train, retriever, protocol, params.agent.top_k),
                                        "oracle": oracle_stats(data.train, retriever, protocol, params, tok)}
            out["indexes"][name] = entry
            print(json.dumps({name: entry}, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
