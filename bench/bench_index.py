"""Index build throughput: `build_index` (Flat, MiniLM) vs the raw encoder's ceiling.

    python bench/bench_index.py                 # all ~55k paragraphs of ../shared/data/corpus (minutes)
    python bench/bench_index.py --limit 2000    # a quick run on a fixed random sample

Both sides encode the same texts ('title\\ntext') with the same model, batch size, max_length and
normalisation:
- ceiling: `SentenceTransformer.encode(texts, batch_size=...)`, model already loaded;
- ours:    `build_index(...)` end to end: model load, corpus hash, sharded encoding with a fresh work
           dir (nothing resumed), .npy shards, faiss add, passages.parquet, sha256s, manifest.
Target: ours >= 90% of the ceiling's passages/s (wall clock; `ratio`); `ratio_cpu` compares process
CPU seconds. Other processes may share the CPU, so by default the sides are interleaved: after each
shard build_index encodes, the raw encoder encodes the next shard_size texts of its own one-call order
(the same batches a single call would run; timed apart and taken out of the build's time), so both
see the same load at the same moments. `--mode back-to-back` runs
each side whole instead (`--repeats 2` alternates the order). The load average is recorded, and
both sides' vectors are compared. The index is kept in --index-dir for bench_search.py.
Results: bench/results/index_build.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from searchrl.config import IndexCfg  # noqa: E402
from searchrl.data.schema import Passage  # noqa: E402
from searchrl.models import resolve  # noqa: E402
from searchrl.retrieval.index import build_index, contents, read_passages  # noqa: E402


def shared_data() -> Path:
    env = os.environ.get("SEARCHRL_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def load_corpus(corpus_dir: Path, limit: int = 0, seed: int = 0) -> list[Passage]:
    """Every paragraph of corpus_dir/*.jsonl, read in place; id = <file stem>:<line>."""
    files = sorted(corpus_dir.glob("*.jsonl"))
    if not files:
        sys.exit(f"no *.jsonl under {corpus_dir} (set SEARCHRL_SHARED_DATA or --corpus-dir)")
    out = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    o = json.loads(line)
                    out.append(Passage(f"{f.stem}:{lineno}", o.get("title", ""), o["text"], o.get("source", "")))
    if limit and limit < len(out):
        out = sorted(random.Random(seed).sample(out, limit), key=lambda p: p.id)
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu_count": os.cpu_count(), "cpu_model": cpu, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_ceiling(texts: list[str], cfg: IndexCfg) -> tuple[dict, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve(cfg.encoder), device="cpu")
    model.max_seq_length = cfg.max_length
    la0, t0, c0 = loadavg(), time.perf_counter(), time.process_time()
    emb = model.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=cfg.normalize,
                       convert_to_numpy=True, show_progress_bar=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": round(dt, 2), "passages_per_s": round(len(texts) / dt, 2), "cpu_seconds": round(cpu, 2),
            "passages_per_cpu_s": round(len(texts) / cpu, 3), "loadavg_before": la0,
            "loadavg_after": loadavg()}, emb


def run_ours(passages: list[Passage], cfg: IndexCfg, index_dir: Path) -> tuple[dict, np.ndarray]:
    import faiss

    work = Path(tempfile.mkdtemp(prefix="bench-index-work-"))
    try:
        la0, t0, c0 = loadavg(), time.perf_counter(), time.process_time()
        stats = build_index(passages, cfg.model_copy(update={"work_dir": str(work)}), index_dir, progress=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    index = faiss.read_index(str(index_dir / "index.faiss"))
    vecs = index.reconstruct_n(0, index.ntotal)
    return {"seconds": round(dt, 2), "passages_per_s": round(len(passages) / dt, 2), "cpu_seconds": round(cpu, 2),
            "passages_per_cpu_s": round(len(passages) / cpu, 3), "encode_seconds": stats["encode_seconds"], "encode_passages_per_s": stats["encoded_per_s"],
            "other_seconds": round(dt - stats["encode_seconds"], 2), "shards": stats["shards"],
            "loadavg_before": la0, "loadavg_after": loadavg()}, vecs


def padding_analysis(texts: list[str], cfg: IndexCfg) -> dict:
    """Tokens the encoder processes (padding included) per real token, for ways of forming batches.

    A batch is padded to its longest member, so the work is the sum over batches of size x longest.
    - raw_encode_one_call: sentence-transformers sorts one call's inputs by characters (the ceiling);
    - build_index: global token-count order, one call per batch (what build_index does);
    - naive_shards_N: shards cut in corpus order, each one encode call (sorted by characters inside);
    - unsorted: batches in corpus order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(cfg.encoder))
    ids = tok(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    tokens = np.array([len(x) for x in ids])
    chars = np.fromiter(map(len, texts), np.int64, len(texts))
    b = cfg.batch_size

    def cost(order: np.ndarray, shard: int | None = None, key: np.ndarray | None = None) -> int:
        groups = [order] if shard is None else [order[a:a + shard] for a in range(0, len(order), shard)]
        total = 0
        for g in groups:
            if key is not None:
                g = g[np.argsort(-key[g], kind="stable")]
            for a in range(0, len(g), b):
                total += len(g[a:a + b]) * int(tokens[g[a:a + b]].max())
        return total

    real = int(tokens.sum())
    rows = np.arange(len(texts))
    out = {"real_tokens": real, "mean_tokens": round(real / len(texts), 1),
           "truncated_share": round(float((tokens >= cfg.max_length).mean()), 4),
           "chars_tokens_correlation": round(float(np.corrcoef(chars, tokens)[0, 1]), 4)}
    for name, value in [("raw_encode_one_call", cost(rows, key=chars)),
                        ("build_index", cost(np.lexsort((rows, -tokens)))),
                        (f"naive_shards_{cfg.shard_size}", cost(rows, cfg.shard_size, chars)),
                        ("naive_shards_64", cost(rows, 64, chars)),
                        ("unsorted", cost(rows))]:
        out[name] = round(value / real, 4)
    return out


def run_interleaved(passages: list[Passage], texts: list[str], cfg: IndexCfg, index_dir: Path,
                    partial=None) -> tuple[dict, dict, list, np.ndarray, np.ndarray]:
    """One end-to-end build_index; after each shard it encodes, the raw encoder encodes as many texts.

    Ours = the build's wall / CPU time minus the time spent in those callbacks, so both sides see the
    same machine load at the same moments (shard granularity)."""
    import faiss
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve(cfg.encoder), device="cpu")
    model.max_seq_length = cfg.max_length
    ceil_parts: list[tuple[np.ndarray, np.ndarray]] = []
    # The ceiling's s-th piece is the s-th run of one big encode call's own order (characters, longest
    # first; shard_size is a multiple of batch_size): the same batches as a single call over all texts.
    ceil_order = np.argsort(-np.fromiter(map(len, texts), np.int64, len(texts)), kind="stable")
    done = 0
    ceil = {"seconds": 0.0, "cpu_seconds": 0.0}
    pause = {"wall": 0.0, "cpu": 0.0, "mark_wall": 0.0, "mark_cpu": 0.0}
    shards: list[dict] = []

    def on_shard(shard: int, rows: np.ndarray) -> None:
        nonlocal done
        p0, q0 = time.perf_counter(), time.process_time()
        ours_wall, ours_cpu = p0 - pause["mark_wall"], q0 - pause["mark_cpu"]
        rows = ceil_order[done:done + len(rows)]
        done += len(rows)
        chunk = [texts[i] for i in rows]
        la, t0, c0 = loadavg(), time.perf_counter(), time.process_time()
        emb = model.encode(chunk, batch_size=cfg.batch_size, normalize_embeddings=cfg.normalize,
                           convert_to_numpy=True, show_progress_bar=False)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        ceil_parts.append((rows, emb))
        ceil["seconds"] += dt
        ceil["cpu_seconds"] += dc
        shards.append({"shard": shard, "passages": len(rows), "ours_seconds": round(ours_wall, 2),
                       "ceiling_seconds": round(dt, 2), "ours_cpu_seconds": round(ours_cpu, 2),
                       "ceiling_cpu_seconds": round(dc, 2), "loadavg": la})
        print(f"shard {shard}: {shards[-1]}", flush=True)
        if partial:
            partial(shards)
        pause["wall"] += time.perf_counter() - p0
        pause["cpu"] += time.process_time() - q0
        pause["mark_wall"], pause["mark_cpu"] = time.perf_counter(), time.process_time()

    work = Path(tempfile.mkdtemp(prefix="bench-index-work-"))
    try:
        la0, t0, c0 = loadavg(), time.perf_counter(), time.process_time()
        pause["mark_wall"], pause["mark_cpu"] = t0, c0
        stats = build_index(passages, cfg.model_copy(update={"work_dir": str(work)}), index_dir, progress=False,
                            on_shard=on_shard)
        wall = time.perf_counter() - t0 - pause["wall"]
        cpu = time.process_time() - c0 - pause["cpu"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(texts)
    ours = {"seconds": round(wall, 2), "passages_per_s": round(n / wall, 2), "cpu_seconds": round(cpu, 2),
            "passages_per_cpu_s": round(n / cpu, 3), "encode_seconds": stats["encode_seconds"],
            "other_seconds": round(wall - stats["encode_seconds"], 2), "shards": stats["shards"],
            "loadavg_before": la0, "loadavg_after": loadavg()}
    ceiling = {"seconds": round(ceil["seconds"], 2), "passages_per_s": round(n / ceil["seconds"], 2),
               "cpu_seconds": round(ceil["cpu_seconds"], 2), "passages_per_cpu_s": round(n / ceil["cpu_seconds"], 3)}
    index = faiss.read_index(str(index_dir / "index.faiss"))
    ceil_emb = np.zeros((n, index.d), dtype=np.float32)
    for rows, emb in ceil_parts:
        ceil_emb[rows] = emb
    return ours, ceiling, shards, index.reconstruct_n(0, index.ntotal), ceil_emb


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="random sample of N passages (0 = all)")
    ap.add_argument("--corpus-dir", type=Path, default=shared_data() / "corpus")
    ap.add_argument("--batch-size", type=int, default=IndexCfg().batch_size)
    ap.add_argument("--max-length", type=int, default=IndexCfg().max_length)
    ap.add_argument("--shard-size", type=int, default=IndexCfg().shard_size)
    ap.add_argument("--mode", choices=["interleaved", "back-to-back"], default="interleaved",
                    help="interleaved: the raw encoder runs on each shard right after build_index encodes it; "
                         "back-to-back: one whole run each")
    ap.add_argument("--order", choices=["ceiling-first", "ours-first"], default="ceiling-first",
                    help="back-to-back: which side runs first")
    ap.add_argument("--repeats", type=int, default=1, help="back-to-back rounds; the order alternates")
    ap.add_argument("--index-dir", type=Path, default=ROOT / ".cache" / "bench" / "index-flat")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "index_build.json")
    ap.add_argument("--padding-only", action="store_true",
                    help="only (re)compute the padding analysis and merge it into --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("faiss", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    passages = load_corpus(args.corpus_dir, args.limit)
    texts = contents(read_passages(passages))
    cfg = IndexCfg(batch_size=args.batch_size, max_length=args.max_length, shard_size=args.shard_size,
                   factory="Flat", kind="dense")
    print(f"{len(passages)} passages, mean {np.mean([len(t) for t in texts]):.0f} chars; batch {cfg.batch_size}, "
          f"max_length {cfg.max_length}, shard {cfg.shard_size}, {args.mode}", flush=True)
    padding = padding_analysis(texts, cfg)
    print(f"padded tokens per real token: {padding}", flush=True)
    if args.padding_only:
        old = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**old, "padding": padding}, indent=2) + "\n", encoding="utf-8")
        return
    report = {
        "benchmark": "index build passages/s: build_index (Flat) vs raw SentenceTransformer.encode",
        "command": " ".join(["python", shlex.quote(os.path.relpath(__file__, ROOT)), *map(shlex.quote,
                                                                                           sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": _versions(),
        "corpus": {"dir": str(args.corpus_dir), "passages": len(passages), "limit": args.limit,
                   "mean_chars": round(float(np.mean([len(t) for t in texts])), 1)},
        "settings": {"encoder": cfg.encoder, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                     "shard_size": cfg.shard_size, "normalize": cfg.normalize, "factory": cfg.factory},
        "mode": args.mode,
        "padding": padding,
        "target_ratio": 0.9,
        "complete": False,
    }

    def save(obj: dict) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    if args.mode == "interleaved":
        ours, ceiling, shards, our_emb, ceil_emb = run_interleaved(
            passages, texts, cfg, args.index_dir, partial=lambda sh: save({**report, "shards": sh}))
        report |= {"ours": ours, "ceiling": ceiling, "shards": shards,
                   "max_abs_diff_vectors": float(np.abs(ceil_emb - our_emb).max())}
        ours_s, ceil_s, ours_cpu, ceil_cpu = (ours["seconds"], ceiling["seconds"], ours["cpu_seconds"],
                                              ceiling["cpu_seconds"])
        n_total = len(passages)
    else:
        rounds = []
        for r in range(args.repeats):
            first = args.order if r % 2 == 0 else ({"ceiling-first": "ours-first", "ours-first": "ceiling-first"}
                                                   [args.order])
            result = {"order": first}
            for side in (["ceiling", "ours"] if first == "ceiling-first" else ["ours", "ceiling"]):
                if side == "ceiling":
                    result["ceiling"], ceil_emb = run_ceiling(texts, cfg)
                else:
                    result["ours"], our_emb = run_ours(passages, cfg, args.index_dir)
                print(f"round {r + 1} {side}: {result[side]}", flush=True)
            result["ratio"] = round(result["ours"]["passages_per_s"] / result["ceiling"]["passages_per_s"], 4)
            result["ratio_cpu"] = round(result["ceiling"]["cpu_seconds"] / result["ours"]["cpu_seconds"], 4)
            result["max_abs_diff_vectors"] = float(np.abs(ceil_emb - our_emb).max())
            rounds.append(result)
        report["rounds"] = rounds
        ours_s, ceil_s = sum(x["ours"]["seconds"] for x in rounds), sum(x["ceiling"]["seconds"] for x in rounds)
        ours_cpu = sum(x["ours"]["cpu_seconds"] for x in rounds)
        ceil_cpu = sum(x["ceiling"]["cpu_seconds"] for x in rounds)
        n_total = len(passages) * len(rounds)

    report |= {"ours_passages_per_s": round(n_total / ours_s, 2), "ceiling_passages_per_s": round(n_total / ceil_s, 2),
               "ratio": round(ceil_s / ours_s, 4), "ratio_cpu": round(ceil_cpu / ours_cpu, 4), "complete": True}
    report["meets_target"] = report["ratio"] >= report["target_ratio"]
    save(report)
    print(f"ours {report['ours_passages_per_s']} passages/s vs ceiling {report['ceiling_passages_per_s']} "
          f"-> ratio {report['ratio']} (cpu {report['ratio_cpu']}; target {report['target_ratio']}) -> {args.out}",
          flush=True)


def _versions() -> dict:
    import faiss
    import sentence_transformers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "faiss": faiss.__version__}


if __name__ == "__main__":
    main()
