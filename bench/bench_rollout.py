"""Rollout engine throughput: batched `run_rollouts` vs a one-question-at-a-time loop.

    python bench/bench_rollout.py                      # 32 Knowledge World questions, SmolLM2-135M, CPU
    python bench/bench_rollout.py --questions 8 --threads 1

Both sides run the same engine, model (SmolLM2-135M-Instruct, HF backend, greedy), protocol,
questions, retriever and caps; the only difference is how many rollouts share a batch:
- batched:    one `run_rollouts` call over all questions (up to agent batch_size concurrent rows), with
              continuous batching (a rollout rejoins the running batch as soon as its documents are in);
- sequential: `run_rollouts` on one question at a time (batch of 1; still the same decode loop);
- rounds:     batched, but in synchronous rounds (`agent.continuous_batching=false`): every rollout of a
              round waits for the slowest before the next round starts (for comparison).
Metric: generated model tokens per wall-clock second (env tokens not counted), and the share of the
batched run's wall time spent inside `retriever.search`. Also recorded: the median cost of one decode
step with 1-32 rows over 380 cached tokens, which bounds what batching can gain on this machine. Targets: >= 5x at 32 concurrent rollouts,
retrieval < 10% of wall time.

The untrained 135M policy almost never opens a query by itself, so by default the prompt ends with
"<external>" (`--force-query`; the model writes the query, the engine retrieves and inserts the
documents, the model continues): every rollout then has at least two segments and one retrieval
round, the shape that matters for the engine. The retriever is the project's dense FAISS index
(all-MiniLM-L6-v2, Flat) built over the Knowledge World corpus into a temp dir, behind the SQLite
retrieval cache when available (`--retriever keyword` uses a tiny in-memory lexical one).

The CPU is shared with other jobs: the sides run back to back (batched, sequential, batched again
with `--repeats 2`) and the load average is recorded. Results: bench/results/rollout.json (or --out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from searchrl.agent.backends import HFBackend  # noqa: E402
from searchrl.agent.engine import RolloutStats, run_rollouts  # noqa: E402
from searchrl.agent.protocols import get_protocol  # noqa: E402
from searchrl.config import AgentCfg, KnowledgeWorldCfg, ProbeCfg  # noqa: E402


def knowledge_world(n: int, seed: int):
    from searchrl.data.knowledge_world import generate

    cfg = KnowledgeWorldCfg(probe=ProbeCfg(enabled=False), n_train=max(8, n), n_eval=max(8, n), n_seen=0)
    data = generate(cfg, seed)
    qs = data.eval[:n]
    if len(qs) < n:
        qs += data.train[: n - len(qs)]
    return qs, data.world.passages


def make_retriever(kind: str, passages, workdir: Path):
    if kind == "keyword":
        from searchrl.agent.fakes import KeywordRetriever

        return KeywordRetriever([(p.id, p.title, p.text) for p in passages]), "keyword (in-memory, idf overlap)"
    from searchrl.config import IndexCfg
    from searchrl.retrieval.index import build_index, load_index

    cfg = IndexCfg()
    build_index(passages, cfg, workdir / "index")
    ret = load_index(workdir / "index", cfg)
    # no retrieval cache: every query pays for encoding + search, as on a cold cache
    return ret, f"dense FAISS {cfg.factory} over {len(passages)} passages, encoder {cfg.encoder}, no cache"


def run_side(backend, retriever, proto, questions, cfg, side: str) -> tuple[RolloutStats, dict, str]:
    """Run one side; returns its stats, the backend's counters and a digest of every trajectory's
    completion token ids (equal digests = token-identical rollouts)."""
    st = RolloutStats()
    before = dict(backend.stats)
    if side in ("batched", "rounds"):
        cfg = cfg.model_copy(update={"continuous_batching": side == "batched"})
        trajs = run_rollouts(backend, retriever, proto, questions, n=1, temperature=0.0, agent_cfg=cfg, stats=st)
    else:
        trajs = [t for q in questions
                 for t in run_rollouts(backend, retriever, proto, [q], n=1, temperature=0.0, agent_cfg=cfg, stats=st)]
    digest = hashlib.sha256(json.dumps([t.completion_ids for t in trajs]).encode()).hexdigest()[:16]
    return st, {k: backend.stats[k] - before[k] for k in ("decode_steps", "prefill_tokens", "reused_tokens")}, digest


def decode_step_ms(backend, rows: int, context: int = 380, steps: int = 12) -> float:
    """Median wall time of one decode step of `rows` rows over about `context` cached tokens, with the
    backend's own cache, attention and step (rows of slightly different lengths, as in a real batch,
    so the step needs its attention mask): what a step costs at each batch occupancy on this machine."""
    import torch

    from searchrl.agent.hf_backend import DecodeStep
    from searchrl.agent.kv_cache import SlotCache

    cache = SlotCache.for_model(backend.model, rows, context + steps + 8)
    step = DecodeStep(backend, cache, static=backend.static_decode, graphs=backend.device.type == "cuda")
    tok = torch.randint(100, 1000, (rows,), device=backend.device)
    pos = [context - j % 8 for j in range(rows)]
    times = []
    with backend.decoding():
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = step(tok, pos).argmax(-1)
            times.append(time.perf_counter() - t0)
            pos = [p + 1 for p in pos]
    return round(1000 * sorted(times)[len(times) // 2], 1)


def summary(st: RolloutStats, bk: dict) -> dict:
    d = st.to_dict()
    d.update(bk)
    d["mean_batch_occupancy"] = st.generated_tokens / bk["decode_steps"] if bk["decode_steps"] else 0.0
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--protocol", default="r1searcher_pp", choices=["r1searcher_pp", "r1searcher"])
    ap.add_argument("--force-query", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--retriever", default="dense", choices=["dense", "keyword"])
    ap.add_argument("--max-segment-tokens", type=int, default=64)
    ap.add_argument("--max-total-tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-kv-reuse", action="store_true", help="disable the HF backend's prefix KV reuse")
    ap.add_argument("--repeats", type=int, default=1, help="2 = batched, sequential, batched again")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rollout.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    questions, passages = knowledge_world(args.questions, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    retriever, ret_desc = make_retriever(args.retriever, passages, tmp)
    backend = HFBackend.load("smollm2-135m-instruct", device="cpu", batch_size=max(32, args.questions),
                             kv_reuse=not args.no_kv_reuse)
    proto = get_protocol(args.protocol)
    if args.force_query:
        proto.assistant_prefix = proto.assistant_prefix + proto.query_open
    cfg = AgentCfg(max_segment_tokens=args.max_segment_tokens, max_total_tokens=args.max_total_tokens,
                   top_k=args.top_k, batch_size=max(32, args.questions))
    # warm-up: one short rollout (first-call costs: kernels, tokenizer, encoder)
    run_rollouts(backend, retriever, proto, questions[:1], agent_cfg=cfg.model_copy(update={"max_total_tokens": 16}))

    runs = []
    load = [os.getloadavg()[0]]
    order = ["batched", "sequential", "rounds"] + (["batched"] if args.repeats >= 2 else [])
    for side in order:
        t0 = time.perf_counter()
        st, bk, digest = run_side(backend, retriever, proto, questions, cfg, side)
        runs.append({"side": side, "wall_s": round(time.perf_counter() - t0, 2), **summary(st, bk),
                     "trajectory_digest": digest,
                     "load_avg_1m_after": round(os.getloadavg()[0], 2)})
        print(f"{side:>10}: {st.generated_tokens} tokens in {st.wall_seconds:.1f}s = {st.tokens_per_second:.1f} tok/s, "
              f"retrieval {100 * st.retrieval_share:.1f}% of wall, rounds {st.rounds}, finish {st.finish}", flush=True)
        load.append(os.getloadavg()[0])
    step_ms = {rows: decode_step_ms(backend, rows) for rows in (1, 2, 4, 8, 16, 32)}
    print("decode step (ms) by rows in the batch:", step_ms)
    bat = [r for r in runs if r["side"] == "batched"]
    seq = next(r for r in runs if r["side"] == "sequential")
    rnd = next(r for r in runs if r["side"] == "rounds")
    bat_tps = sum(r["tokens_per_second"] for r in bat) / len(bat)
    speedup = bat_tps / seq["tokens_per_second"] if seq["tokens_per_second"] else float("nan")
    ret_share = sum(r["retrieval_share"] for r in bat) / len(bat)
    result = {
        "bench": "rollout",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_avg_1m_during": [round(x, 2) for x in load]},
        "setup": {"model": "smollm2-135m-instruct (float32, CPU)", "backend": "hf", "kv_reuse": not args.no_kv_reuse,
                  "decode_mode": "static" if backend.static_decode else "dynamic",
                  "protocol": args.protocol, "force_query": args.force_query, "questions": len(questions),
                  "question_source": f"Knowledge World eval split (seed {args.seed})", "retriever": ret_desc,
                  "max_segment_tokens": cfg.max_segment_tokens, "max_total_tokens": cfg.max_total_tokens,
                  "top_k": cfg.top_k, "temperature": 0.0},
        "runs": runs,
        "decode_step_ms_by_rows": step_ms,
        "batched_tokens_per_s": round(bat_tps, 2),
        "sequential_tokens_per_s": seq["tokens_per_second"],
        "speedup": round(speedup, 2),
        "rounds_tokens_per_s": rnd["tokens_per_second"],
        "rounds_speedup": round(rnd["tokens_per_second"] / seq["tokens_per_second"], 2),
        "retrieval_share_batched": round(ret_share, 4),
        "identical_trajectories": len({r["trajectory_digest"] for r in runs}) == 1,
        "targets": {"speedup": ">= 5", "retrieval_share": "< 0.10"},
        "met": {"speedup": bool(speedup >= 5), "retrieval_share": bool(ret_share < 0.10)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"speedup {speedup:.2f}x (synchronous rounds {result['rounds_speedup']:.2f}x), retrieval share {100 * ret_share:.1f}% -> {args.out}")


if __name__ == "__main__":
    main()
