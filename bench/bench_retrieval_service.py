"""Retrieval as a service vs in process: throughput and latency under concurrent clients, and the share
of rollout wall time spent in retrieval through the service.

    python bench/bench_retrieval_service.py                       # both parts
    python bench/bench_retrieval_service.py --part throughput --queries 256
    python bench/bench_retrieval_service.py --part rollout --questions 32

throughput: the same index (MiniLM, Flat, --passages paragraphs of the shared corpus; built once into
    --index-dir) and the same HotpotQA dev questions, k=3, at 1 / 16 / 64 concurrent clients, each
    client a thread sending one query per call (what rollout workers that do not batch send):
    - in-process: the threads share one loaded retriever (`load_index`) and call `search([q], 3)`;
    - service: `python -m searchrl.retrieval.serve` in a subprocess (coalescing, --max-batch 64), the
      threads share one pooled `HTTPRetriever` and POST /search with one query each;
    - batched (reference): one caller, `search(64 queries, 3)` per call, in process.
    Per configuration: queries/s over the whole run and per-call latency p50 / p99 (ms). The sides
    alternate (in-process, service, then again in the other order with --rounds 2) because the CPU is
    shared with other jobs; the load average is recorded. Target: service >= 0.9x in-process at 64.
rollout: bench_rollout.py's batched side (SmolLM2-135M, HF backend, CPU, greedy, 32 Knowledge World
    questions, the prompt opening a query) with its dense index behind the service (`HTTPRetriever`
    with the factory's retry policy, no cache: every query goes over the wire) and, for comparison, in
    process. Metric: engine.RolloutStats.retrieval_share = seconds inside `retriever.search` / rollout
    wall time. Target < 10%.

Both run on one machine: the clients, the server and (rollout) the policy share its CPUs. Results are
merged into bench/results/retrieval_service.json (bench_retrieval_scale.py adds the 2M-passage part).
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
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_index import load_corpus, loadavg, machine, shared_data  # noqa: E402

from searchrl import services  # noqa: E402
from searchrl.config import IndexCfg  # noqa: E402
from searchrl.retrieval.http import HTTPRetriever  # noqa: E402
from searchrl.retrieval.index import build_index, load_index  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "retrieval_service.json"


def merge_results(path: Path, key: str, value: dict) -> None:
    """Write `value` under `key` of the results file, keeping the other parts."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_clients(search, queries: list[str], clients: int, k: int) -> dict:
    """`clients` threads, each calling search([q], k) over its share of `queries`; wall-clock
    throughput and per-call latency."""
    shares = [queries[i::clients] for i in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def worker(mine: list[str]) -> None:
        own = []
        barrier.wait()
        for q in mine:
            t0 = time.perf_counter()
            try:
                search([q], k)
            except Exception as err:  # noqa: BLE001 - counted, reported
                errors.append(f"{type(err).__name__}: {err}")
            own.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=worker, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "queries": len(queries), "seconds": round(wall, 3),
            "queries_per_s": round(len(queries) / wall, 2),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 2), "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def run_batched(retriever, queries: list[str], k: int, batch: int = 64) -> dict:
    lat = []
    t0 = time.perf_counter()
    for a in range(0, len(queries), batch):
        s = time.perf_counter()
        retriever.search(queries[a:a + batch], k)
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    return {"batch": batch, "queries": len(queries), "seconds": round(wall, 3),
            "queries_per_s": round(len(queries) / wall, 2), "p50_call_ms": round(1000 * statistics.median(lat), 2)}


def load_questions(limit: int) -> list[str]:
    path = shared_data() / "qa" / "hotpotqa" / "dev_ircot500_with_contexts.jsonl"
    qs = [json.loads(line)["question_text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return (qs * (limit // len(qs) + 1))[:limit]


def ensure_index(index_dir: Path, passages: int) -> None:
    if (index_dir / "manifest.json").exists() and (index_dir / "passages.arrow").exists():
        return
    print(f"building the bench index ({passages} corpus paragraphs, MiniLM, Flat) in {index_dir}", flush=True)
    build_index(load_corpus(shared_data() / "corpus", limit=passages, seed=0), IndexCfg(), index_dir, progress=False)


def serve_cmd(index_dir: Path, port: int, threads: int, max_batch: int) -> list[str]:
    return [sys.executable, "-m", "searchrl.retrieval.serve", "--index", str(index_dir), "--port", str(port),
            "--threads", str(threads), "--max-batch", str(max_batch)]


def part_throughput(args) -> dict:
    index_dir = Path(args.index_dir)
    ensure_index(index_dir, args.passages)
    queries = load_questions(args.queries)
    inproc = load_index(index_dir)
    inproc.search(queries[:8], args.k)  # warm-up: first-call costs
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="bench-retrieval-")) / "serve.log"
    rounds = []
    with services.running(serve_cmd(index_dir, port, args.server_threads, args.max_batch), f"{url}/health",
                          log_path=log, timeout_s=600, name="retrieval server"):
        client = HTTPRetriever(url, pool_size=max(args.clients) + 8)
        client.search(queries[:8], args.k)  # warm-up over the wire
        for r in range(args.rounds):
            order = ["in_process", "service"] if r % 2 == 0 else ["service", "in_process"]
            row = {"order": order, "loadavg_before": loadavg()}
            for side in order:
                search = inproc.search if side == "in_process" else client.search
                row[side] = {}
                for c in args.clients:
                    before = _server_stats(url) if side == "service" else None
                    res = run_clients(search, queries, c, args.k)
                    if before is not None:
                        after = _server_stats(url)
                        res["server_index_searches"] = after["searches"] - before["searches"]
                        res["server_mean_batch"] = round(res["queries"] / max(1, res["server_index_searches"]), 1)
                    row[side][str(c)] = res
                    print(f"round {r} {side:>10} {c:>2} clients: {res['queries_per_s']:8.1f} q/s, p50 {res['p50_ms']:7.1f} "
                          f"ms, p99 {res['p99_ms']:7.1f} ms" + (f", {res.get('server_index_searches')} index searches"
                                                               if side == "service" else ""), flush=True)
            row["batched_in_process"] = run_batched(inproc, queries, args.k)
            row["loadavg_after"] = loadavg()
            rounds.append(row)
    summary = {}
    for c in args.clients:
        ip = statistics.mean(r["in_process"][str(c)]["queries_per_s"] for r in rounds)
        sv = statistics.mean(r["service"][str(c)]["queries_per_s"] for r in rounds)
        summary[str(c)] = {
            "in_process_qps": round(ip, 1), "service_qps": round(sv, 1), "service_over_in_process": round(sv / ip, 2),
            "in_process_p50_ms": round(statistics.mean(r["in_process"][str(c)]["p50_ms"] for r in rounds), 1),
            "in_process_p99_ms": round(statistics.mean(r["in_process"][str(c)]["p99_ms"] for r in rounds), 1),
            "service_p50_ms": round(statistics.mean(r["service"][str(c)]["p50_ms"] for r in rounds), 1),
            "service_p99_ms": round(statistics.mean(r["service"][str(c)]["p99_ms"] for r in rounds), 1)}
    top = str(max(args.clients))
    batched = statistics.mean(r["batched_in_process"]["queries_per_s"] for r in rounds)
    m = inproc.manifest
    return {"index": {"dir": os.path.relpath(index_dir, ROOT), "kind": m["kind"], "factory": m.get("factory"),
                      "encoder": m.get("encoder"), "passages": m["n_passages"]},
            "queries": {"source": "HotpotQA dev (dev_ircot500_with_contexts.jsonl)", "n": len(queries), "k": args.k},
            "server": {"threads": args.server_threads or "all", "max_batch": args.max_batch, "max_wait_ms": 2.0},
            "rounds": rounds, "summary": summary, "batched_in_process_qps": round(batched, 1),
            "target": f"service >= 0.9 x in-process throughput at {top} clients",
            "met": summary[top]["service_over_in_process"] >= 0.9}


def _server_stats(url: str) -> dict:
    import requests

    return requests.get(f"{url}/stats", timeout=30).json()


def part_rollout(args) -> dict:
    import torch
    from bench_rollout import knowledge_world

    from searchrl.agent.backends import HFBackend
    from searchrl.agent.engine import RolloutStats, run_rollouts
    from searchrl.agent.protocols import get_protocol
    from searchrl.config import AgentCfg

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    questions, passages = knowledge_world(args.questions, 0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-retrieval-rollout-"))
    build_index(passages, IndexCfg(), tmp / "index", progress=False)
    backend = HFBackend.load("smollm2-135m-instruct", device="cpu", batch_size=max(32, args.questions))
    proto = get_protocol("r1searcher_pp")
    proto.assistant_prefix = proto.assistant_prefix + proto.query_open  # every rollout searches (bench_rollout)
    cfg = AgentCfg(max_segment_tokens=64, max_total_tokens=256, top_k=3, batch_size=max(32, args.questions))
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    out = {}
    with services.running(serve_cmd(tmp / "index", port, args.server_threads, args.max_batch), f"{url}/health",
                          log_path=tmp / "serve.log", timeout_s=600, name="retrieval server"):
        sides = {"service": HTTPRetriever(url).with_retries(3, 0.5), "in_process": load_index(tmp / "index")}
        for retriever in sides.values():
            run_rollouts(backend, retriever, proto, questions[:1], agent_cfg=cfg.model_copy(update={"max_total_tokens": 16}))
        for name in ("service", "in_process"):
            st = RolloutStats()
            la = loadavg()
            run_rollouts(backend, sides[name], proto, questions, n=1, temperature=0.0, agent_cfg=cfg, stats=st)
            d = st.to_dict()
            out[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()
                         if k in ("wall_seconds", "retrieval_seconds", "retrieval_calls", "queries", "unique_queries",
                                  "generated_tokens", "tokens_per_second", "retrieval_share", "rounds")}
            out[name]["loadavg_before"] = la
            print(f"rollout via {name:>10}: wall {st.wall_seconds:.1f}s, retrieval {st.retrieval_seconds:.2f}s "
                  f"({100 * st.retrieval_share:.2f}%), {st.retrieval_calls} calls / {st.queries} queries", flush=True)
    share = out["service"]["retrieval_share"]
    return {"setup": {"model": "smollm2-135m-instruct (float32, CPU, HF backend)", "questions": len(questions),
                      "protocol": "r1searcher_pp, prompt opens a query", "index": f"MiniLM Flat over {len(passages)} "
                      "Knowledge World passages", "cache": "none (every query over the wire)", "top_k": 3,
                      "max_total_tokens": 256, "temperature": 0.0},
            "runs": out, "retrieval_share_service": share, "target": "< 0.10", "met": share < 0.10}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["throughput", "rollout", "all"], default="all")
    ap.add_argument("--index-dir", default=str(ROOT / ".cache" / "bench" / "index-service"))
    ap.add_argument("--passages", type=int, default=8192, help="corpus paragraphs in the bench index")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--server-threads", type=int, default=0, help="the server's --threads (0 = all CPUs)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "loadavg_start": loadavg()}
    if args.part in ("throughput", "all"):
        merge_results(Path(args.out), "throughput", {**meta, **part_throughput(args)})
    if args.part in ("rollout", "all"):
        merge_results(Path(args.out), "rollout_share", {**meta, **part_rollout(args)})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
