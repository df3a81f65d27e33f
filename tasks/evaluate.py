"""DVC stage `evaluate`: every method in params.evaluate.methods on the eval split(s).

Reads data/prepared/eval.parquet (and seen.parquet for the Knowledge World's seen-facts split, which
is answered closed-book to measure memorization), data/index. Each method answers every question
`evaluate.samples` times per seed of `evaluate.seeds` (greedy once by default); the LLM judge
(`evaluate.judge`, searchrl/judge.py) adds LasJ. Writes under reports/eval/:
    metrics.json        {dataset: {method: metric means, <key>_lo / <key>_hi 95% intervals}} (DVC metrics)
    paired.json         paired comparisons between methods (DVC metrics)
    judge.json          judge usage: requests, cache hits, unparseable replies, tokens (DVC metrics)
    predictions/<method>.jsonl   one row per question and sample, with its trajectory
    table.md            the R1-Searcher++ Table-1 layout, every metric with intervals, the comparisons
    f1_vs_rc.png        F1 against retrieval count per method (DVC plot)
    trajectories.html   the trajectory viewer (searchrl/trajectory_view.py)
all logged to one MLflow run (metrics and the folder as artifacts).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from searchrl import evaluation, reports, tracking
from searchrl.config import PROTOCOLS, Params
from searchrl.data.schema import read_qa
from searchrl.evaluation import is_trained
from searchrl.io import atomic_path, write_json
from searchrl.stage import run_stage, stage_args
from searchrl.validation import validate_frame

log = logging.getLogger("searchrl.evaluate")

# agent_<protocol>: the base policy in the agent loop of that protocol (searchrl/agent/protocols)
AGENT_METHODS = {f"agent_{name}": name for name in PROTOCOLS}


def trained_model(params: Params, method: str) -> tuple[str, str]:
    """(model dir, protocol it was trained with) of `sft`, `rl` or `rl_<ablation>`."""
    if method == "sft":
        return params.sft.out_dir, params.agent.protocol
    cfg = params.rl_config(None if method == "rl" else method.removeprefix("rl_"))
    return cfg.out_dir, cfg.protocol


def evaluate(params: Params) -> None:
    from searchrl.agent.backends import make_backend
    from searchrl.judge import check_judge
    from searchrl.retrieval.factory import open_eval_retriever

    cfg = params.evaluate
    check_judge(cfg.judge)  # a missing API key is one line before any work
    prepared = Path(params.prepare.out_dir)
    records = read_qa(prepared / "eval.parquet")
    if cfg.max_questions:
        records = records[: cfg.max_questions]
    seen = read_qa(prepared / "seen.parquet") if (prepared / "seen.parquet").exists() else []
    retriever = open_eval_retriever(params)  # retrieval.backend: web checks its API keys here, before any model loads

    base = make_backend(params.policy, params.agent)
    preds: list[evaluation.Prediction] = []
    for method in cfg.methods:
        if is_trained(method):
            model_dir, protocol = trained_model(params, method)
            backend = make_backend(params.policy.model_copy(update={"model": model_dir}), params.agent)
        else:
            backend, protocol = base, AGENT_METHODS.get(method)
        preds.extend(predict_method(params, method, backend, protocol, retriever, records))
        if seen and (method == "direct" or is_trained(method)):  # closed-book on facts seen in training
            closed = evaluation.predict_direct(backend, seen, cfg.max_new_tokens, cfg.batch_size)
            for p in closed:
                p.dataset, p.method = f"{p.dataset}_seen", f"{method}_closed_book"
            preds.extend(closed)

    judge_stats = judge_predictions(params, preds, base)
    frame = pd.DataFrame([p.row() for p in preds])
    validate_frame(frame, "predictions", "eval_predictions")
    metrics = evaluation.summarize(preds, cfg.bootstrap, params.seed)
    paired = evaluation.paired_comparisons(preds, cfg.comparisons(), cfg.bootstrap, params.seed)
    out_dir = Path(cfg.out_dir)
    publish(out_dir, frame, metrics, paired, judge_stats, cfg.methods)
    rl_curves(params, out_dir / "rl_curves.png")
    memorized = memorization_metrics(params, preds)
    write_json(out_dir / "memorization.json", memorized)
    tracking.log_metrics(tracking.flatten(metrics))
    tracking.log_metrics(tracking.flatten({"paired": paired}))
    if judge_stats:
        tracking.log_metrics({f"judge/{k}": v for k, v in judge_stats.items()})
    tracking.log_artifact(cfg.out_dir)
    print(evaluation.markdown_table(metrics))


def predict_method(params: Params, method: str, backend, protocol: str | None, retriever,
                   records: list) -> list[evaluation.Prediction]:
    """Every answer of one method: `evaluate.samples` per question for each seed of `evaluate.seeds`
    (params.seed when empty); `sample` numbers run on across seeds (seed k holds k*samples ...)."""
    cfg = params.evaluate
    seeds = cfg.seed_list(params.seed)
    sampling = {"n": cfg.samples, "temperature": cfg.temperature, "top_p": cfg.top_p}
    log.info("evaluate: %s on %d questions x %d samples x %d seeds", method, len(records), cfg.samples, len(seeds))
    preds: list[evaluation.Prediction] = []
    for k, seed in enumerate(seeds):
        if method == "direct":
            out, secs = evaluation.timed(evaluation.predict_direct, backend, records, cfg.max_new_tokens,
                                         cfg.batch_size, seed=seed, **sampling)
        elif method == "rag":
            out, secs = evaluation.timed(evaluation.predict_rag, backend, retriever, records, cfg.top_k,
                                         cfg.max_new_tokens, params.agent.max_passage_words, seed=seed, **sampling)
        else:
            agent_cfg = params.agent.model_copy(update={"top_k": cfg.top_k})
            out, secs = evaluation.timed(evaluation.predict_agent, backend, retriever, records, protocol,
                                         agent_cfg, method, seed, **sampling)
            warning = evaluation.budget_warning(out, method, agent_cfg.max_total_tokens, cfg.top_k,
                                                params.agent.top_k)
            if warning:
                log.warning(warning)
        for p in out:
            p.sample += k * cfg.samples
        log.info("evaluate: %s (seed %d) done in %.1fs (%.2f answers/s)", method, seed, secs,
                 len(out) / max(secs, 1e-9))
        preds.extend(out)
    return preds


def judge_predictions(params: Params, preds: list[evaluation.Prediction], base) -> dict:
    """LasJ on every prediction (`evaluate.judge`; nothing when its backend is none); returns the judge's
    usage for judge.json and MLflow ({} without a judge). A local judge of the policy's own model reuses
    the loaded base backend."""
    from searchrl.judge import PROMPT_VERSION, make_judge

    cfg = params.evaluate.judge
    same = cfg.backend == "local" and cfg.model == params.policy.model and params.agent.backend in ("hf", "vllm")
    judge = make_judge(cfg, params.policy, params.agent, backend=base if same else None)
    if judge is None:
        return {}
    try:
        evaluation.apply_judge(judge, preds)
    finally:
        judge.cache.close()
    stats = judge.stats.as_dict()
    log.info("evaluate: judge %s (%s): %d judged, %d requests, %d from the cache, %d unparseable replies, "
             "%d + %d tokens", cfg.model, cfg.backend, stats["judged"], stats["requests"], stats["cache_hits"],
             stats["unparseable"], stats["prompt_tokens"], stats["completion_tokens"])
    if stats["unparseable"]:
        log.warning("evaluate: %d judge replies were neither True nor False (scored as not True; see the "
                    "'judge_reply' column of the predictions)", stats["unparseable"])
    return {"backend": cfg.backend, "model": cfg.model, "prompt_version": PROMPT_VERSION, **stats}


def publish(out_dir: Path, frame: pd.DataFrame, metrics: dict, paired: dict | None = None,
            judge: dict | None = None, methods: list[str] | None = None) -> None:
    """Every file of reports/eval except memorization.json and rl_curves.png (see the module docstring)."""
    from searchrl.trajectory_view import write_trajectories_html

    with atomic_path(out_dir / "predictions") as tmp:
        tmp.mkdir(parents=True)
        for method, rows in frame.groupby("method", sort=False):
            rows.to_json(tmp / f"{method}.jsonl", orient="records", lines=True, force_ascii=False)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "paired.json", paired or {})
    write_json(out_dir / "judge.json", judge or {})
    with atomic_path(out_dir / "table.md") as tmp:
        tmp.write_text(reports.report_markdown(metrics, paired or {}, methods, judge) + "\n", encoding="utf-8")
    reports.plot_f1_vs_rc(metrics, out_dir / "f1_vs_rc.png", methods)
    main = set(reports.main_datasets(metrics))  # the closed-book seen-facts rows are not trajectories
    write_trajectories_html((r for r in frame.to_dict("records") if r["dataset"] in main or not main),
                            out_dir / "trajectories.html", methods)


def memorization_metrics(params: Params, preds: list[evaluation.Prediction]) -> dict:
    """Per RL model: closed-book CEM / F1 on the seen-facts questions whose facts the RL run actually
    trained on (a question it rolled out, per reports/rl/<run>/log.csv, used the fact), before RL (its
    init model: sft, or the base policy `direct`) and after. The whole seen split mostly holds facts
    a short RL run never visited."""
    from searchrl.training.curves import read_log

    closed: dict[str, dict[str, evaluation.Prediction]] = {}
    for p in preds:
        if p.method.endswith("_closed_book"):
            closed.setdefault(p.method.removesuffix("_closed_book"), {})[p.id] = p
    out: dict[str, dict] = {}
    for method, after in closed.items():
        log_csv = Path(params.rl.metrics_dir) / method / "log.csv"
        if not (is_trained(method) and method != "sft" and log_csv.exists()):
            continue
        init = params.rl_config(None if method == "rl" else method.removeprefix("rl_")).init
        before = closed.get("sft" if init == params.sft.out_dir else "direct")
        if before is None:
            continue
        visited = {q for row in read_log(log_csv) for q in (row.get("questions") or "").split()}
        ids = [i for i, p in after.items() if visited & set(p.metadata.get("seen_from", []))]
        m = {"facts": len(ids), "trained_questions": len(visited),
             "before": "sft" if init == params.sft.out_dir else "direct"}
        for key in ("cem", "f1"):
            m[f"{key}_before"] = _percent([before[i].scores[key] for i in ids])
            m[f"{key}_after"] = _percent([after[i].scores[key] for i in ids])
        out[method] = m
        log.info("evaluate: %s memorization: %d seen facts trained on, closed-book CEM %s -> %s", method,
                 len(ids), m["cem_before"], m["cem_after"])
    return out


def _percent(values: list[float]) -> float | None:
    return round(100 * sum(values) / len(values), 2) if values else None


def rl_curves(params: Params, out: Path) -> None:
    """The training curves of every evaluated RL model in one figure (from reports/rl/<run>/log.csv;
    empty panels when no RL model is evaluated, so the DVC plot output always exists)."""
    from searchrl.training.curves import plot_curves, read_log

    logs = {m: Path(params.rl.metrics_dir) / m / "log.csv" for m in params.evaluate.methods
            if is_trained(m) and m != "sft"}
    plot_curves({m: read_log(path) for m, path in logs.items() if path.exists()}, out)


def main(argv: list[str] | None = None) -> None:
    stage_args("tasks.evaluate", __doc__, argv)
    run_stage("evaluate", evaluate, inputs=["data/prepared", "data/index"])


if __name__ == "__main__":
    main()
