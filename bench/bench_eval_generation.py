"""Evaluation generation throughput: batched closed-book answering vs one question at a time.

    python bench/bench_eval_generation.py                  # 32 Knowledge World eval questions
    python bench/bench_eval_generation.py --questions 16 --batch-size 16

Both sides run the closed-book generation of the evaluate stage's "direct" baseline with the same model
(SmolLM2-135M-Instruct, HF backend, greedy), questions and max_new_tokens; the only difference is the
batch size (all questions per batch vs 1). Metric: generated tokens per wall-clock second. The sides
run back to back and the load average is recorded (the CPU may be shared). Results:
bench/results/eval_generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_side(backend, questions: list[str], batch_size: int, max_new_tokens: int) -> dict:
    """The evaluate stage's closed-book generation itself (`answer_closed_book`), timed; generated
    tokens counted by the backend."""
    from searchrl.agent.backends import answer_closed_book

    before = backend.stats["generated_tokens"]
    t0 = time.perf_counter()
    answers = answer_closed_book(backend, questions, max_new_tokens, batch_size)
    wall = time.perf_counter() - t0
    tokens = backend.stats["generated_tokens"] - before
    return {"batch_size": batch_size, "wall_s": round(wall, 3), "generated_tokens": tokens,
            "tokens_per_second": round(tokens / wall, 2), "answers": answers,
            "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench/results/eval_generation.json"))
    args = ap.parse_args()

    import torch

    from searchrl.agent.backends import make_backend
    from searchrl.config import Params
    from searchrl.data.prepare import load_knowledge_world

    params = Params()
    params.prepare.knowledge_world.probe.enabled = False  # questions only; no probe needed
    questions = [r.question for r in load_knowledge_world(params).eval][: args.questions]
    backend = make_backend(params.policy, params.agent)
    batched = run_side(backend, questions, args.batch_size, args.max_new_tokens)
    single = run_side(backend, questions, 1, args.max_new_tokens)
    same = batched.pop("answers") == single.pop("answers")
    result = {
        "bench": "eval_generation",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "setup": {"model": "smollm2-135m-instruct (float32, CPU, HF backend, greedy)",
                  "questions": len(questions), "max_new_tokens": args.max_new_tokens},
        "runs": [batched, single],
        "same_answers": same,
        "speedup": round(batched["tokens_per_second"] / single["tokens_per_second"], 2),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup", "same_answers")} | {
        "batched_tok_s": batched["tokens_per_second"], "single_tok_s": single["tokens_per_second"]}))


if __name__ == "__main__":
    main()
