"""DVC stage `sample`: rejection-sampled trajectories for the SFT cold start, and difficulty labels.

Reads <prepare.out_dir>/train.parquet and the index; runs the samplers of params.sample
(searchrl/training/sampling.py); validates the kept trajectories with the Great Expectations "sft"
suite (a failure stops the stage, nothing is published); writes <sample.out_dir>/trajectories.jsonl
(Trajectory.to_dict() + sampler per line), difficulty.parquet (every training question:
easy / medium / difficult / unknown) and stats.json (DVC metrics: acceptance per sampler and filter,
the internal / external / mixed mix); one MLflow run with the same metrics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from searchrl import tracking
from searchrl.config import Params
from searchrl.data.schema import read_qa
from searchrl.errors import InputError, SearchRLError
from searchrl.io import atomic_path, write_json
from searchrl.stage import run_stage, stage_args
from searchrl.training import sampling
from searchrl.validation import validate_frame

log = logging.getLogger("searchrl.sample")

def trajectory_frame(kept: list[sampling.Candidate]) -> pd.DataFrame:
    rows = []
    for i, c in enumerate(kept):
        t = c.traj
        rows.append({"id": f"{t.question_id}#{c.sampler}#{i}", "question_id": t.question_id, "sampler": c.sampler,
                     "text": t.completion_text, "answer": t.answer, "retrievals": t.retrievals,
                     "n_tokens": len(t.completion_ids)})
    return pd.DataFrame(rows, columns=["id", "question_id", "sampler", "text", "answer", "retrievals", "n_tokens"])


def sample(params: Params) -> dict:
    from searchrl.agent.backends import make_backend
    from searchrl.agent.protocols import get_protocol
    from searchrl.models import load_tokenizer
    from searchrl.retrieval.factory import open_retriever
    from searchrl.training.teacher import make_teacher_backend

    cfg = params.sample
    train_path = Path(params.prepare.out_dir) / "train.parquet"
    train = read_qa(train_path)
    if not train:
        raise InputError(train_path, "train split is empty: nothing to sample trajectories for",
                         fix="give prepare training data (prepare.jsonl.train / hf datasets with role: train)")
    records = sampling.random_subset(train, cfg.max_questions, params.seed)
    protocol = get_protocol(params.agent.protocol, params.agent, max_answer_words=cfg.max_answer_words)
    retriever = open_retriever(params)
    student_tok = load_tokenizer(params.policy.model)

    def backend_for(name: str):
        if name == "policy":
            return make_backend(params.policy, params.agent)
        return make_teacher_backend(cfg.teacher_model, student_tokenizer=student_tok, protocol=protocol,
                                    policy_cfg=params.policy, agent_cfg=params.agent, api=cfg.teacher_api,
                                    served_model=cfg.teacher_served_model, api_key_env=cfg.teacher_api_key_env,
                                    concurrency=cfg.teacher_concurrency, timeout_s=cfg.teacher_timeout_s)

    log.info("sample: %d of %d training questions, samplers %s, %d samples each at temperature %.2f",
             len(records), len(train), cfg.sampler, cfg.n_samples, cfg.temperature)
    result = sampling.run_sampling(
        records, cfg.sampler, backend_for, retriever, protocol, params.agent, n_samples=cfg.n_samples,
        temperature=cfg.temperature, top_p=cfg.top_p, keep_per_question=cfg.keep_per_question,
        max_answer_words=cfg.max_answer_words, oracle_variants=cfg.oracle_variants,
        easy_min_rate=cfg.difficulty.easy_min_rate, medium_min_rate=cfg.difficulty.medium_min_rate,
        seed=params.seed, model_max_questions=cfg.model_max_questions, oracle_tokenizer=student_tok)

    if not result.kept:
        rates = {n: f"{100 * st.get('acceptance', 0.0):.1f}%" for n, st in result.stats["samplers"].items()}
        raise SearchRLError(f"sample: no trajectory passed the filters (acceptance {rates}); add the oracle "
                            "sampler (training data with gold evidence) or a teacher to sample.sampler, or set "
                            "rl.init: policy to start RL without the SFT cold start")
    frame = trajectory_frame(result.kept)
    n_tokens = dict(zip(frame["text"], frame["n_tokens"], strict=True))
    validate_frame(frame, "sft", "sft_trajectories", min_tokens=1, max_tokens=params.agent.max_total_tokens,
                   count_tokens=lambda text: int(n_tokens[text]), **protocol.validation_tags())

    sampled = {row["id"]: row for row in result.difficulty}
    difficulty = pd.DataFrame([sampled.get(r.id) or {"id": r.id, "difficulty": "unknown", "n_samples": 0,
                                                     "n_correct": 0, "correct_rate": 0.0, "sampler": ""}
                               for r in train])
    stats = {**result.stats, "train_questions": len(train)}
    out = Path(cfg.out_dir)
    fp = sampling.tokenizer_fingerprint(student_tok)
    with atomic_path(out / "trajectories.jsonl") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for c in result.kept:
                f.write(json.dumps(sampling.jsonl_row(c, fp), ensure_ascii=False) + "\n")
    with atomic_path(out / "difficulty.parquet") as tmp:
        difficulty.to_parquet(tmp, index=False)
    write_json(out / "stats.json", stats)
    tracking.log_metrics(tracking.flatten({"sample": stats}))
    tracking.log_artifact(out / "stats.json")
    for name, st in stats["samplers"].items():
        log.info("sample: %-7s %4d candidates, acceptance %.1f%%, kept %d", name, st["candidates"],
                 100 * st.get("acceptance", 0.0), st["kept"])
    log.info("sample: kept %d trajectories for %d questions; mix %s; difficulty %s", stats["kept"],
             stats["questions_covered"], stats["mix"], stats["difficulty"])
    return stats


def main(argv: list[str] | None = None) -> None:
    stage_args("tasks.sample", __doc__, argv)
    run_stage("sample", sample, inputs=["data/prepared/train.parquet", "data/index"])


if __name__ == "__main__":
    main()
