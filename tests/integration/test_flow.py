"""The Prefect flow on a dataset the prepare stage rejects: the flow fails with the stage's own
message, nothing downstream runs, no retry is spent on it, and the previous outputs survive."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QA = [("Which city is the capital of Veloria?", "Ostrava"), ("Who founded Brightmill?", "Ada Korr"),
      ("What language is spoken in Veloria?", "Velorian"), ("Where is Brightmill based?", "Ostrava")]
PASSAGES = [("Veloria", "Veloria is a country whose capital is Ostrava; people there speak Velorian."),
            ("Brightmill", "Brightmill is a company founded by Ada Korr, based in Ostrava.")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def jsonl_overrides(data: Path, eval_name: str = "eval.jsonl") -> list[str]:
    qa = [{"idx": i, "question": q, "answer": a} for i, (q, a) in enumerate(QA)]
    train = write_jsonl(data / "train.jsonl", qa[:2])
    evals = data / eval_name
    if not evals.exists():
        write_jsonl(evals, qa[2:])
    corpus = write_jsonl(data / "corpus.jsonl", [{"title": t, "text": x} for t, x in PASSAGES])
    return [
        "prepare.source=jsonl",
        f"prepare.jsonl.train=[{{path: '{train}', format: r1searcher, dataset: toy}}]",
        f"prepare.jsonl.eval=[{{path: '{evals}', format: r1searcher, dataset: toy}}]",
        f"prepare.jsonl.corpus=[{{path: '{corpus}', format: passages}}]",
        "sample.sampler=[policy]",  # answers only: no gold evidence for the oracle sampler / rewriter
        "rl.rewriter=policy",
        "pipeline.retries=2",
    ]


def snapshot(ws: Path) -> dict[str, bytes]:
    files = [ws / "dvc.lock", *sorted((ws / "data").rglob("*"))]
    return {str(p.relative_to(ws)): p.read_bytes() for p in files if p.is_file() and "cache" not in p.parts}


def task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_failing_dataset_stops_the_flow_and_keeps_previous_outputs(pipeline_env, prefect_api):
    from flows.pipeline import searchrl_pipeline

    data = pipeline_env / "input"
    data.mkdir()
    overrides = jsonl_overrides(data)
    stages = ["prepare", "index"]

    first = searchrl_pipeline(overrides=overrides, stages=stages)
    ws = Path(first["workspace"])
    assert ws == pipeline_env / "runs" / "custom"
    assert first["ran"] == ["prepare", "index"]
    assert set(first["stage_seconds"]) == {"prepare", "index"} and all(v > 0 for v in first["stage_seconds"].values())
    assert (ws / "data" / "prepared" / "eval.parquet").is_file()
    assert (ws / "data" / "index" / "manifest.json").is_file()
    before = snapshot(ws)

    # The eval file edited in place, corrupted: its line 3 is not JSON. The input files are
    # dependencies of the workspace's prepare stage, so DVC reruns prepare on the edit alone.
    bad = data / "eval.jsonl"
    bad.write_text(bad.read_text() + '{"idx": 9, "question": "broken\n', encoding="utf-8")
    state = searchrl_pipeline(overrides=jsonl_overrides(data), stages=stages, return_state=True)

    assert state.is_failed()
    message = state.message + "\n" + str(state.result(raise_on_failure=False))
    assert "stage 'prepare' failed" in message
    assert "eval.jsonl, line 3: malformed JSON" in message  # the stage's own error, not just an exit code
    runs = task_runs(state.state_details.flow_run_id)
    assert [r.name for r in runs] == ["dvc-repro-prepare"]  # index never started
    assert runs[0].run_count == 1  # a user error is not retried (pipeline.retries=2)
    assert snapshot(ws) == before  # prepared data, index and dvc.lock untouched


def test_cli_reports_a_bad_override_in_one_line(pipeline_env):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "flows.pipeline", "--set", "evaluate.topk=3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown key 'evaluate.topk' (did you mean 'top_k'?)" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (pipeline_env / "runs").exists()


def test_unknown_stage_is_rejected(pipeline_env, prefect_api):
    from flows.pipeline import searchrl_pipeline

    state = searchrl_pipeline(stages=["prepare", "trian"], return_state=True)
    assert state.is_failed()
    assert "unknown stage(s) trian" in state.message
