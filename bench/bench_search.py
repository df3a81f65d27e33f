"""Search throughput on a real index: batched calls vs one query per call, same queries.

    python bench/bench_search.py                  # 500 HotpotQA dev questions, 64 per batched call,
                                                  # Flat MiniLM index over 8,192 random local paragraphs
    python bench/bench_search.py --rounds 1 --queries 128
    python bench/bench_search.py --limit 0        # the index over all ~55k paragraphs (~45 min to build)

The index is exactly the one reported: a dense Flat index (all-MiniLM-L6-v2, the default IndexCfg)
over `--limit` paragraphs of ../shared/data/corpus drawn with `--seed` (bench_index.load_corpus, the
sample bench_index.py --limit N draws too). An index already in --index-dir is used only when its
manifest's corpus hash, kind, factory and encoder are those of that input; otherwise it is built
there first (~6 minutes for 8,192 paragraphs on a 2-core CPU). The report records the input (corpus
dir, limit, seed, corpus hash) and whether the index was built or verified. Each round times both modes
over the same queries, alternating which goes first, so load from other processes hits both alike;
`Retriever.search` does one encode call + one faiss search per call. Also reported: where a batched
call spends its time (query encoding / faiss / passage lookup), whether both modes return the same
hits, and replay speed through the SQLite retrieval cache (every query a hit).
Results: bench/results/search.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_index import load_corpus, loadavg, machine, shared_data  # noqa: E402

from searchrl.config import IndexCfg  # noqa: E402
from searchrl.errors import SearchRLError  # noqa: E402
from searchrl.retrieval.cache import CachedRetriever  # noqa: E402
from searchrl.retrieval.index import (  # noqa: E402
    build_index,
    check_matches_cfg,
    corpus_hash,
    load_index,
    read_manifest,
    read_passages,
)

DEFAULT_LIMIT = 8192


def index_matches(index_dir: Path, chash: str, cfg: IndexCfg) -> bool:
    """True when index_dir holds an index of exactly this corpus (its hash) built with cfg's settings
    (kind, encoder, factory, normalisation: searchrl.retrieval.index.check_matches_cfg)."""
    try:
        manifest = read_manifest(index_dir)
        check_matches_cfg(index_dir, manifest, cfg)
    except SearchRLError:
        return False
    return manifest.get("corpus_hash") == chash


def ensure_index(index_dir: Path, corpus_dir: Path, limit: int, seed: int) -> dict:
    """Build (or verify) the index over exactly `limit` paragraphs of corpus_dir drawn with `seed`;
    returns the input's description for the report."""
    passages = load_corpus(corpus_dir, limit, seed)
    cfg = IndexCfg(kind="dense", factory="Flat")
    chash = corpus_hash(read_passages(passages))
    built = not index_matches(index_dir, chash, cfg)
    if built:
        print(f"building the index over {len(passages)} paragraphs of {corpus_dir} (seed {seed}) in {index_dir}",
              flush=True)
        build_index(passages, cfg, index_dir)
    else:
        print(f"{index_dir}: verified (corpus hash {chash}, {len(passages)} paragraphs)", flush=True)
    return {"dir": str(corpus_dir), "limit": limit, "seed": seed, "passages": len(passages), "corpus_hash": chash,
            "index_built_here": built}


def load_queries(path: Path, limit: int = 0) -> list[str]:
    qs = [json.loads(line)["question_text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return qs[:limit] if limit else qs


def time_batched(r, queries: list[str], k: int, batch: int) -> tuple[float, list]:
    t0, out = time.perf_counter(), []
    for a in range(0, len(queries), batch):
        out.extend(r.search(queries[a:a + batch], k))
    return time.perf_counter() - t0, out


def time_single(r, queries: list[str], k: int) -> tuple[float, list]:
    t0, out = time.perf_counter(), []
    for q in queries:
        out.extend(r.search([q], k))
    return time.perf_counter() - t0, out


def breakdown(r, queries: list[str], k: int, batch: int) -> dict:
    """Seconds per stage of the batched path, summed over the batches."""
    enc = fa = take = 0.0
    for a in range(0, len(queries), batch):
        t0 = time.perf_counter()
        emb = r.encoder.encode_queries(queries[a:a + batch])
        t1 = time.perf_counter()
        scores, ids = r.index.search(emb, k)
        t2 = time.perf_counter()
        r.store.hits(ids, scores)
        t3 = time.perf_counter()
        enc, fa, take = enc + t1 - t0, fa + t2 - t1, take + t3 - t2
    return {"encode_s": round(enc, 3), "faiss_s": round(fa, 3), "passage_lookup_s": round(take, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-dir", type=Path, default=shared_data() / "corpus")
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                    help=f"paragraphs in the index, a seeded random sample (0 = all; default {DEFAULT_LIMIT})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the paragraph sample")
    ap.add_argument("--index-dir", type=Path, default=None,
                    help="where the index is built or verified (default .cache/bench/search-flat-<limit>-seed<seed>)")
    ap.add_argument("--questions", type=Path,
                    default=shared_data() / "qa" / "hotpotqa" / "dev_ircot500_with_contexts.jsonl")
    ap.add_argument("--queries", type=int, default=0, help="first N questions (0 = all)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("faiss", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.index_dir is None:
        args.index_dir = ROOT / ".cache" / "bench" / f"search-flat-{args.limit or 'all'}-seed{args.seed}"
    corpus = ensure_index(args.index_dir, args.corpus_dir, args.limit, args.seed)
    queries = load_queries(args.questions, args.queries)
    t0 = time.perf_counter()
    r = load_index(args.index_dir)
    load_s = time.perf_counter() - t0
    assert r.manifest["corpus_hash"] == corpus["corpus_hash"], "the index loaded is not the one reported"
    print(f"{r}: loaded in {load_s:.1f}s; {len(queries)} queries, k={args.k}, batch {args.batch}", flush=True)
    r.search(queries[: args.batch], args.k)  # warm-up (allocator, BLAS threads)
    r.search(queries[:1], args.k)

    rounds, agree = [], None
    for i in range(args.rounds):
        modes = ["batched", "single"] if i % 2 == 0 else ["single", "batched"]
        res, outs = {"order": "-".join(modes), "loadavg_before": loadavg()}, {}
        for mode in modes:
            if mode == "batched":
                secs, outs[mode] = time_batched(r, queries, args.k, args.batch)
            else:
                secs, outs[mode] = time_single(r, queries, args.k)
            res[mode] = {"seconds": round(secs, 3), "queries_per_s": round(len(queries) / secs, 2)}
        res["speedup"] = round(res["batched"]["queries_per_s"] / res["single"]["queries_per_s"], 2)
        res["loadavg_after"] = loadavg()
        if agree is None:  # same top-k ids (ties apart) in both modes
            b, s = outs["batched"], outs["single"]
            agree = {"top1_same": sum(x[0].id == y[0].id for x, y in zip(b, s, strict=True)) / len(b),
                     "topk_overlap": sum(len({h.id for h in x} & {h.id for h in y}) for x, y in
                                         zip(b, s, strict=True)) / (len(b) * args.k)}
        rounds.append(res)
        print(f"round {i + 1}: {res}", flush=True)

    parts = breakdown(r, queries, args.k, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        cache = CachedRetriever(r, Path(tmp) / "cache.sqlite")
        fill_s, _ = time_batched(cache, queries, args.k, args.batch)
        replay_s, _ = time_batched(cache, queries, args.k, args.batch)
    batched = statistics.median(x["batched"]["queries_per_s"] for x in rounds)
    single = statistics.median(x["single"]["queries_per_s"] for x in rounds)
    report = {
        "benchmark": f"search queries/s: {args.batch} queries per call vs 1 per call, same queries",
        "command": " ".join(["python", shlex.quote(os.path.relpath(__file__, ROOT)),
                             *map(shlex.quote, sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "corpus": corpus,
        "index": {"dir": os.path.relpath(args.index_dir, ROOT), "kind": r.manifest["kind"],
                  "factory": r.manifest.get("factory"), "encoder": r.manifest.get("encoder"),
                  "passages": r.manifest["n_passages"], "corpus_hash": r.manifest["corpus_hash"],
                  "load_seconds": round(load_s, 2)},
        "queries": {"file": str(args.questions), "n": len(queries), "k": args.k, "batch": args.batch},
        "rounds": rounds,
        "batched_queries_per_s": batched,
        "single_queries_per_s": single,
        "speedup": round(batched / single, 2),
        "same_results": agree,
        "batched_breakdown": parts,
        "cache": {"fill_queries_per_s": round(len(queries) / fill_s, 2),
                  "replay_queries_per_s": round(len(queries) / replay_s, 2)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"batched {batched} q/s vs single {single} q/s -> x{report['speedup']}; cache replay "
          f"{report['cache']['replay_queries_per_s']} q/s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
