"""The smoke preset end to end through the Prefect flow, as a user runs it (`make smoke` runs the same
command), then again: the second run reruns nothing because DVC finds every stage up to date."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.pipeline import dvc_stages
from tests.conftest import PROJECT_ROOT, pipeline_env_vars

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CMD = [sys.executable, "-m", "flows.pipeline", "--preset", "configs/smoke.yaml"]


def run_flow(tmp_path: Path) -> str:
    env = {**os.environ, **pipeline_env_vars(tmp_path)}
    for key in ("PREFECT_API_URL", "SEARCHRL_PARENT_RUN_ID", "SEARCHRL_ROOT"):
        env.pop(key, None)
    out = subprocess.run(CMD, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    return log


def mlflow_runs(tmp_path: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("searchrl")
    assert exp is not None, "no 'searchrl' experiment in the tracking store"
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_smoke_pipeline_end_to_end_then_up_to_date(tmp_path):
    log = run_flow(tmp_path)
    ws = tmp_path / "runs" / "smoke"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    stages = dvc_stages(ws)
    assert {"prepare", "index", "evaluate"} <= set(stages)
    for stage in stages:
        assert f"Running stage '{stage}'" in log

    # prepare: the splits and corpus, its DVC metrics, and a Great Expectations report per frame
    prepared = ws / "data" / "prepared"
    for name in ("train", "eval", "seen", "corpus"):
        assert len(pd.read_parquet(prepared / f"{name}.parquet")) > 0, name
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["eval"]["n"] == params["prepare"]["knowledge_world"]["n_eval"]
    for name in ("train", "eval", "seen", "corpus", "eval_predictions"):
        report = json.loads((ws / "reports" / "validation" / f"{name}.json").read_text())
        assert report["success"] is True, name

    # index: the manifest matches the corpus
    manifest = json.loads((ws / "data" / "index" / "manifest.json").read_text())
    assert manifest["n_passages"] == stats["corpus"]["n"]
    assert manifest["kind"] == "dense"

    # evaluate: every configured method scored, with EM / F1 / CEM / retrievals
    metrics = json.loads((ws / "reports" / "eval" / "metrics.json").read_text())
    methods = set(params["evaluate"]["methods"])
    scored = {m for per_dataset in metrics.values() for m in per_dataset}
    assert methods <= scored, (methods, scored)
    for per_dataset in metrics.values():
        for method in methods & set(per_dataset):
            assert {"em", "f1", "cem", "retrievals"} <= set(per_dataset[method])
    for method in methods:
        assert (ws / "reports" / "eval" / "predictions" / f"{method}.jsonl").is_file()
    assert "| dataset | method |" in log  # the table, in the flow's log

    # LasJ through the local judge stand-in (evaluate.judge: local, the embedded model): every
    # prediction judged, next to F1 / EM / CEM / RC with intervals; the reports people look at
    judge = json.loads((ws / "reports" / "eval" / "judge.json").read_text())
    assert judge["backend"] == "local" and judge["judged"] > 0 and judge["completion_tokens"] > 0
    for per_dataset in metrics.values():
        for method in methods & set(per_dataset):
            m = per_dataset[method]
            assert 0 <= m["lasj"] <= 100 and "lasj_unparseable" in m and m["f1_lo"] <= m["f1"] <= m["f1_hi"]
    table_md = (ws / "reports" / "eval" / "table.md").read_text()
    assert "| Method |" in table_md and "LasJ" in table_md and "Avg RC" in table_md
    assert json.loads((ws / "reports" / "eval" / "paired.json").read_text())
    assert (ws / "reports" / "eval" / "f1_vs_rc.png").read_bytes()[:4] == b"\x89PNG"
    assert 'id="data"' in (ws / "reports" / "eval" / "trajectories.html").read_text()

    # the flow published the evaluation table as a Prefect artifact
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        artifacts = db.execute("SELECT key, type, data FROM artifact").fetchall()
    assert any(key == "searchrl-eval-smoke" and kind == "markdown" and "| dataset | method |" in data
               for key, kind, data in artifacts), artifacts

    # MLflow: one parent run for the flow; under it one run per DVC stage, with the lineage tags
    runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["preset"] == "smoke"
    by_id = {r.info.run_id: r for r in runs}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(stages), sorted(r.data.tags.get("stage") for r in children)
    tagged = {r.data.tags["stage"]: r for r in children}
    assert {"prepare", "index", "evaluate"} <= set(tagged)
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags["stage"]
        assert run.data.tags["git_commit"] and run.data.tags["params_hash"], run.data.tags["stage"]
    for run in runs:  # anything a stage opens inside its run nests under it: nothing is orphaned
        while run.info.run_id != parent.info.run_id:
            assert "mlflow.parentRunId" in run.data.tags, run.data.tags.get("stage")
            run = by_id[run.data.tags["mlflow.parentRunId"]]
    assert any(k.startswith("dvc.dep.") for k in tagged["index"].data.tags)
    assert any(k.startswith("dvc.dep.") for k in tagged["evaluate"].data.tags)
    assert "evaluate.top_k" in tagged["evaluate"].data.params
    ev = tagged["evaluate"]
    assert any(k.endswith("/lasj") or k.endswith(".lasj") for k in ev.data.metrics), sorted(ev.data.metrics)[:20]
    assert ev.data.metrics["judge/judged"] > 0
    from mlflow import MlflowClient

    stored = {a.path for a in MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(
        ev.info.run_id, "eval")}
    assert {"eval/table.md", "eval/trajectories.html", "eval/f1_vs_rc.png"} <= stored, stored

    # Second run: DVC finds every stage up to date, nothing reruns, nothing is rewritten.
    lock = (ws / "dvc.lock").read_bytes()
    log2 = run_flow(tmp_path)
    assert "Running stage" not in log2, log2[-4000:]
    for stage in stages:
        assert f"Stage '{stage}' didn't change, skipping" in log2
    assert "DVC ran: nothing (all stages up to date)" in log2
    assert (ws / "dvc.lock").read_bytes() == lock
    assert len(mlflow_runs(tmp_path)) == len(runs) + 1  # only the flow's new parent run
