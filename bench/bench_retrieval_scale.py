"""The index stage and the retrieval service at scale, on synthetic data: 2M passages with synthetic
vectors (no encoder) -> an IVF-PQ index built by `build_index`, served by `searchrl.retrieval.serve`.

    python bench/bench_retrieval_scale.py                          # 2M passages, dim 768, IVF2048,PQ64
    python bench/bench_retrieval_scale.py --passages 200000 --factory IVF512,PQ64

Steps, each in its own process so each has its own peak RSS (VmHWM):
  build   a corpus frame of N passages ("passage <i>: " + filler, --text-chars characters each) and
          `build_index(corpus, IndexCfg(factory=...), out)` with a `SyntheticEncoder` in place of the
          sentence encoder: the real build path (token-length order, resumable .npy shards, training
          on index.train_sample vectors, adding in chunks from the memory-mapped shards, parquet +
          Arrow passage store, manifest with sha256s). Vectors: a low-rank Gaussian mixture (1000
          centres in a 64-dim latent space, latent spread 0.6, mapped to --dim by a fixed random
          matrix, isotropic noise 0.05, L2-normalised), generated per 65,536-row block from a seeded
          RNG, so any row can be regenerated alone. Query j is a noisy copy (latent noise 0.3) of
          passage (7919 j + 13) mod N.
  truth   exact inner-product top-10 of --truth-queries queries over all N vectors, streamed from
          the shards in 65,536-row chunks (faiss IndexFlatIP per chunk, merged).
  serve   `python -m searchrl.retrieval.serve`'s `serve()` over `load_index(out, encoder=synthetic)`
          (queries are sent as "q<j>", which the synthetic encoder maps to query vector j).
Measured: build seconds (and their parts), build peak RSS, index bytes per passage (index.faiss;
the passage store separately), the server's load seconds and RSS (anon vs file-backed: the
memory-mapped Arrow store shows up as file pages), recall@10 against exact search through the
service (POST /search k=10), QPS through the service at 64 concurrent single-query clients, and
in process (batched and 64 threads) with nprobe 16 / 64. Merged into bench/results/retrieval_service.json
under "scale". Keep the machine otherwise idle (the load average is recorded): the CPU is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BLOCK = 65536
RANK, CENTERS, SPREAD, NOISE, QUERY_NOISE = 64, 1000, 0.6, 0.05, 0.3
FILLER = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
          "dolore magna aliqua ") * 20


def proc_status(pid: int | str = "self") -> dict:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


# ----------------------------------------------------------------------------- synthetic vectors
class SyntheticEncoder:
    """Stands in for `searchrl.retrieval.encoder.Encoder` (same attributes and methods build_index and
    load_index use). Passage vectors come from the row number in the text ("passage <i>: ..."),
    query vectors from "q<j>" (rows of a precomputed query matrix)."""

    def __init__(self, n: int, dim: int, seed: int = 0, queries_path: str | None = None):
        from searchrl.io import stable_hash

        self.n, self.dim, self.seed = n, dim, seed
        self.name = self.path = f"synthetic-lowrank{RANK}-d{dim}"
        self.max_length, self.normalize, self.batch_size = 256, True, 8192
        self.query_instruction = self.passage_prefix = ""
        self.fingerprint = stable_hash({"name": self.name, "n": n, "seed": seed, "centers": CENTERS,
                                        "spread": SPREAD, "noise": NOISE})
        rng = np.random.default_rng([seed, 1])
        self.proj = (rng.standard_normal((RANK, dim)) / np.sqrt(RANK)).astype(np.float32)
        self.centers = rng.standard_normal((CENTERS, RANK)).astype(np.float32)
        self._block: tuple[int, np.ndarray] | None = None
        self.queries = np.load(queries_path, mmap_mode="r") if queries_path else None

    def settings(self) -> dict:
        return {"encoder": self.name, "encoder_fingerprint": self.fingerprint, "dim": self.dim,
                "max_length": self.max_length, "normalize": self.normalize,
                "query_instruction": self.query_instruction, "passage_prefix": self.passage_prefix}

    def token_lengths(self, texts: list[str]) -> np.ndarray:
        return np.full(len(texts), 64, dtype=np.int64)  # equal lengths: shards in corpus order

    def latent(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, b])
        labels = rng.integers(0, CENTERS, BLOCK)
        return self.centers[labels] + SPREAD * rng.standard_normal((BLOCK, RANK), dtype=np.float32)

    def block_vectors(self, b: int) -> np.ndarray:
        if self._block is None or self._block[0] != b:
            noise = np.random.default_rng([self.seed, 3, b]).standard_normal((BLOCK, self.dim), dtype=np.float32)
            x = self.latent(b) @ self.proj + NOISE * noise
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            self._block = (b, x)
        return self._block[1]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        blocks = rows // BLOCK
        for b in np.unique(blocks):
            sel = blocks == b
            out[sel] = self.block_vectors(int(b))[rows[sel] % BLOCK]
        return out

    def encode_passages(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        return self.rows(np.array([int(t[len("Synthetic "):t.index("\n")]) for t in texts], dtype=np.int64))

    def encode_queries(self, queries: list[str], batch_size: int | None = None) -> np.ndarray:
        return np.ascontiguousarray(self.queries[[int(q[1:]) for q in queries]], dtype=np.float32)

    def make_queries(self, count: int) -> np.ndarray:
        """Query j: a noisy copy of passage (7919 j + 13) mod n's latent, through the same projection."""
        src = (7919 * np.arange(count, dtype=np.int64) + 13) % self.n
        rng = np.random.default_rng([self.seed, 4])
        out = np.empty((count, self.dim), dtype=np.float32)
        for b in np.unique(src // BLOCK):
            sel = src // BLOCK == b
            out[sel] = self.latent(int(b))[src[sel] % BLOCK] @ self.proj
        out = out + (QUERY_NOISE * rng.standard_normal((count, RANK), dtype=np.float32)) @ self.proj
        out += NOISE * rng.standard_normal(out.shape, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def corpus(n: int, chars: int):
    import pandas as pd

    filler = FILLER[: max(0, chars - 20)]
    return pd.DataFrame({"id": [f"s{i}" for i in range(n)], "title": [f"Synthetic {i}" for i in range(n)],
                         "text": [f"passage {i}: {filler}" for i in range(n)], "source": "synthetic"})


def index_cfg(args):
    from searchrl.config import IndexCfg

    return IndexCfg(encoder=f"synthetic-lowrank{RANK}-d{args.dim}", factory=args.factory, batch_size=8192,
                    shard_size=8192, train_sample=args.train_sample, nprobe=16, keep_embeddings=True,
                    work_dir=str(Path(args.work) / "shards"))


# ----------------------------------------------------------------------------- steps
class PeakSampler:
    """Samples this process's RssAnon / RssFile every `every` seconds: VmHWM alone counts the
    file-backed pages of memory-mapped shards (page cache) with the process's own memory."""

    def __init__(self, every: float = 0.2):
        import threading

        self.peak = {"RssAnon": 0.0, "RssFile": 0.0, "VmRSS": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            now = proc_status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], now[k])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {f"peak_{k}": v for k, v in self.peak.items()}


def step_build(args) -> dict:
    from searchrl.retrieval.index import build_index

    sampler = PeakSampler()
    t0 = time.perf_counter()
    df = corpus(args.passages, args.text_chars)
    corpus_s = time.perf_counter() - t0
    rss_corpus = proc_status()
    enc = SyntheticEncoder(args.passages, args.dim, args.seed)
    stats = build_index(df, index_cfg(args), Path(args.work) / "index", encoder=enc, seed=args.seed, progress=False)
    return {"corpus_frame_seconds": round(corpus_s, 1), "rss_after_corpus_frame_mib": rss_corpus["VmRSS"],
            "build": stats, "rss": {**proc_status(), **sampler.stop()}}


def step_truth(args) -> dict:
    import faiss

    from searchrl.retrieval.index import ShardReader

    work = Path(args.work)
    enc = SyntheticEncoder(args.passages, args.dim, args.seed)
    q = enc.make_queries(args.truth_queries)
    np.save(work / "queries.npy", q)
    shard_dir = next(d for d in (work / "shards").iterdir() if (d / "key.json").is_file())
    paths = sorted(shard_dir.glob("shard-*.npy"))
    order = np.load(shard_dir / "order.npy")
    reader = ShardReader(paths, order, 8192, args.dim)
    k = 10
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    t0 = time.perf_counter()
    for a, chunk in zip(range(0, args.passages, BLOCK), reader.chunks(BLOCK), strict=True):
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(chunk)
        s, i = flat.search(q, k)
        s_all, i_all = np.hstack([best_s, s]), np.hstack([best_i, i + a])
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    np.save(work / "truth.npy", best_i)
    return {"queries": len(q), "seconds": round(time.perf_counter() - t0, 1), "rss": proc_status()}


def load_synthetic(args, nprobe: int | None = None):
    from searchrl.config import IndexCfg
    from searchrl.retrieval.index import load_index, read_manifest

    work = Path(args.work)
    m = read_manifest(work / "index")
    enc = SyntheticEncoder(args.passages, args.dim, args.seed, queries_path=str(work / "queries.npy"))
    cfg = IndexCfg(encoder=m["encoder"], factory=m["factory"], nprobe=nprobe or m["nprobe"], batch_size=8192)
    return load_index(work / "index", cfg, encoder=enc, verify=False)


def step_serve(args) -> int:
    from searchrl.retrieval.serve import ServerSettings, ServerState, serve, set_threads
    from searchrl.stage import setup_logging

    setup_logging()
    threads = set_threads(0)
    state = ServerState(ServerSettings(max_batch=64, threads=threads))
    return serve(state, "127.0.0.1", args.port, loader=lambda: load_synthetic(args))


def recall_at_10(found: list[list[str]], truth: np.ndarray) -> float:
    hits = [len({int(h[1:]) for h in row[:10]} & set(t.tolist())) / 10 for row, t in zip(found, truth, strict=True)]
    return round(float(np.mean(hits)), 4)


# ----------------------------------------------------------------------------- orchestration
def run_step(args, step: str, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--step", step, *sys_argv_without_step(), *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"step {step} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{step}: {json.dumps(res)[:600]}", flush=True)
    return res


def sys_argv_without_step() -> list[str]:
    argv, out, skip = sys.argv[1:], [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--step":
            skip = True
            continue
        out.append(a)
    return out


def orchestrate(args) -> dict:
    import requests
    from bench_index import loadavg, machine
    from bench_retrieval_service import RESULTS, merge_results, run_clients

    from searchrl import services
    from searchrl.retrieval.http import HTTPRetriever

    work = Path(args.work)
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    la = [loadavg()]
    build = run_step(args, "build")
    la.append(loadavg())
    truth_step = run_step(args, "truth")
    la.append(loadavg())
    index_dir = work / "index"
    files = {p.name: p.stat().st_size for p in index_dir.iterdir() if p.is_file()}
    truth = np.load(work / "truth.npy")
    queries = [f"q{j}" for j in range(len(truth))]

    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, __file__, "--step", "serve", "--port", str(port), *sys_argv_without_step()]
    t0 = time.perf_counter()
    with services.running(cmd, f"{url}/health", log_path=work / "serve.log", timeout_s=1800, name="scale server",
                          interval_s=0.5) as svc:
        ready_s = time.perf_counter() - t0
        rss_ready = proc_status(svc.pid)
        client = HTTPRetriever(url, pool_size=80, timeout_s=300)
        found = []
        for a in range(0, len(queries), 64):
            found += [[h.id for h in row] for row in client.search(queries[a:a + 64], 10)]
        recall_service = recall_at_10(found, truth)
        served = run_clients(client.search, (queries * 4)[: args.qps_queries], 64, 10)
        served_batched_t0 = time.perf_counter()
        for a in range(0, len(queries), 256):
            client.search(queries[a:a + 256], 10)
        served_batched = len(queries) / (time.perf_counter() - served_batched_t0)
        rss_after = proc_status(svc.pid)
        server_stats = requests.get(f"{url}/stats", timeout=30).json()
        la.append(loadavg())
    inproc = {}
    for nprobe in (16, 64):
        r = load_synthetic(args, nprobe)
        t0 = time.perf_counter()
        rows = r.search(queries, 10)
        batched_qps = len(queries) / (time.perf_counter() - t0)
        threads = run_clients(r.search, (queries * 4)[: args.qps_queries], 64, 10)
        inproc[str(nprobe)] = {"recall_at_10": recall_at_10([[h.id for h in row] for row in rows], truth),
                               "batched_qps": round(batched_qps, 1), "threads64": threads}
    la.append(loadavg())
    n = args.passages
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys_argv_without_step()]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "loadavg": la,
        "setup": {"passages": n, "dim": args.dim, "factory": args.factory, "train_sample": args.train_sample,
                  "text_chars": args.text_chars, "vectors": f"low-rank Gaussian mixture ({CENTERS} centres, rank {RANK}, "
                  f"spread {SPREAD}, noise {NOISE}; queries: latent noise {QUERY_NOISE})", "nprobe_served": 16,
                  "truth_queries": len(truth)},
        "build": {"seconds": build["build"]["seconds"], "encode_seconds (synthetic vectors + shard writes)":
                  build["build"]["encode_seconds"], "corpus_frame_seconds": build["corpus_frame_seconds"],
                  "peak_rss_mib": build["rss"]["VmHWM"], "peak_anon_rss_mib": build["rss"]["peak_RssAnon"],
                  "peak_file_rss_mib (memory-mapped shards, page cache)": build["rss"]["peak_RssFile"],
                  "rss_after_corpus_frame_mib": build["rss_after_corpus_frame_mib"],
                  "wall_seconds": build["wall_seconds"]},
        "index_files_bytes": files,
        "index_bytes_per_passage": round(files["index.faiss"] / n, 1),
        "flat_bytes_per_passage": 4 * args.dim,
        "passage_store_bytes_per_passage": round(files["passages.arrow"] / n, 1),
        "exact_truth": truth_step,
        "service": {"ready_seconds": round(ready_s, 1), "rss_ready_mib": rss_ready, "rss_after_mib": rss_after,
                    "recall_at_10": recall_service, "clients64": served,
                    "batched_256_per_request_qps": round(served_batched, 1),
                    "index_searches": server_stats["searches"], "mean_batch": server_stats["mean_batch_queries"]},
        "in_process": inproc,
    }
    merge_results(Path(args.out or RESULTS), "scale", result)
    if not args.keep:
        shutil.rmtree(work / "shards", ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--factory", default="IVF2048,PQ64")
    ap.add_argument("--train-sample", type=int, default=100_000)
    ap.add_argument("--text-chars", type=int, default=600)
    ap.add_argument("--truth-queries", type=int, default=1000)
    ap.add_argument("--qps-queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench" / "scale"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir (shards: 4 x dim bytes per passage)")
    ap.add_argument("--out", default="")
    ap.add_argument("--step", choices=["build", "truth", "serve"], default=None)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.step == "build":
        print(json.dumps(step_build(args)))
    elif args.step == "truth":
        print(json.dumps(step_truth(args)))
    elif args.step == "serve":
        sys.exit(step_serve(args))
    else:
        res = orchestrate(args)
        print(json.dumps({k: res[k] for k in ("build", "index_bytes_per_passage", "service")}, indent=1))


if __name__ == "__main__":
    main()
