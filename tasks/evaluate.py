"""DVC stage `evaluate`: every method in params.evaluate.methods on the eval split(s).

Reads data/prepared/eval.parquet (and seen.parquet for the Knowledge World's seen-facts split, which
is answered closed-book to measure memorization), data/index; writes reports/eval/metrics.json (DVC
metrics), reports/eval/predictions/<method>.jsonl, reports/eval/table.md; one MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from searchrl import evaluation, tracking
from searchrl.config import Params
from searchrl.data.schema import read_qa
from searchrl.evaluation import is_trained
from searchrl.io import atomic_path, write_json
from searchrl.stage import run_stage
from searchrl.validation import validate_frame

log = logging.getLogger("searchrl.evaluate")

AGENT_METHODS = {"agent_r1searcher_pp": "r1searcher_pp", "agent_r1searcher": "r1searcher"}


def trained_model(params: Params, method: str) -> tuple[str, str]:
    """(model dir, protocol it was trained with) of `sft`, `rl` or `rl_<ablation>`."""
    if method == "sft":
        return params.sft.out_dir, params.agent.protocol
    cfg = params.rl_config(None if method == "rl" else method.removeprefix("rl_"))
    return cfg.out_dir, cfg.protocol


def evaluate(params: Params) -> None:
    from searchrl.agent.backends import make_backend
    from searchrl.retrieval.factory import open_retriever

    cfg = params.evaluate
    prepared = Path(params.prepare.out_dir)
    records = read_qa(prepared / "eval.parquet")
    if cfg.max_questions:
        records = records[: cfg.max_questions]
    seen = read_qa(prepared / "seen.parquet") if (prepared / "seen.parquet").exists() else []
    retriever = open_retriever(params)

    base = make_backend(params.policy, params.agent)
    preds: list[evaluation.Prediction] = []
    for method in cfg.methods:
        if is_trained(method):
            model_dir, protocol = trained_model(params, method)
            backend = make_backend(params.policy.model_copy(update={"model": model_dir}), params.agent)
        else:
            backend, protocol = base, AGENT_METHODS.get(method)
        log.info("evaluate: %s on %d questions", method, len(records))
        if method == "direct":
            out, secs = evaluation.timed(evaluation.predict_direct, backend, records, cfg.max_new_tokens,
                                         cfg.batch_size)
        elif method == "rag":
            out, secs = evaluation.timed(evaluation.predict_rag, backend, retriever, records, cfg.top_k,
                                         cfg.max_new_tokens, params.agent.max_passage_words)
        else:
            agent_cfg = params.agent.model_copy(update={"top_k": cfg.top_k})
            out, secs = evaluation.timed(evaluation.predict_agent, backend, retriever, records, protocol,
                                         agent_cfg, method, params.seed)
        log.info("evaluate: %s done in %.1fs (%.2f questions/s)", method, secs, len(records) / max(secs, 1e-9))
        preds.extend(out)
        if seen and (method == "direct" or is_trained(method)):  # closed-book on facts seen in training
            closed = evaluation.predict_direct(backend, seen, cfg.max_new_tokens, cfg.batch_size)
            for p in closed:
                p.dataset, p.method = f"{p.dataset}_seen", f"{method}_closed_book"
            preds.extend(closed)

    frame = pd.DataFrame([p.row() for p in preds])
    validate_frame(frame, "predictions", "eval_predictions")
    metrics = evaluation.summarize(preds)
    publish(Path(cfg.out_dir), frame, metrics)
    rl_curves(params, Path(cfg.out_dir) / "rl_curves.png")
    memorized = memorization_metrics(params, preds)
    write_json(Path(cfg.out_dir) / "memorization.json", memorized)
    tracking.log_metrics(tracking.flatten(metrics))
    tracking.log_artifact(cfg.out_dir)
    print(evaluation.markdown_table(metrics))


def publish(out_dir: Path, frame: pd.DataFrame, metrics: dict) -> None:
    with atomic_path(out_dir / "predictions") as tmp:
        tmp.mkdir(parents=True)
        for method, rows in frame.groupby("method", sort=False):
            rows.to_json(tmp / f"{method}.jsonl", orient="records", lines=True, force_ascii=False)
    write_json(out_dir / "metrics.json", metrics)
    with atomic_path(out_dir / "table.md") as tmp:
        tmp.write_text(evaluation.markdown_table(metrics) + "\n", encoding="utf-8")


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


def main() -> None:
    run_stage("evaluate", evaluate, inputs=["data/prepared", "data/index"])


if __name__ == "__main__":
    main()
