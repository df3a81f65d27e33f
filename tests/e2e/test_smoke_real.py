"""The real-data CI preset (configs/smoke_real.yaml) end to end through the Prefect flow, as a user
runs it: real MuSiQue-Ans questions for training (the evidence oracle writes the SFT cold start from
their gold decompositions), real IRCoT HotpotQA questions for evaluation, real Wikipedia paragraphs,
BM25, and every stage: prepare, index, sample, sft, rl and its ablations (the oracle memorization
rewriter on real evidence), evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.pipeline import dvc_stages
from tests.conftest import PROJECT_ROOT, pipeline_env_vars

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.shared_data]

CMD = [sys.executable, "-m", "flows.pipeline", "--preset", "configs/smoke_real.yaml"]


def run_flow(tmp_path: Path) -> str:
    env = {**os.environ, **pipeline_env_vars(tmp_path)}
    for key in ("PREFECT_API_URL", "SEARCHRL_PARENT_RUN_ID", "SEARCHRL_ROOT"):
        env.pop(key, None)
    out = subprocess.run(CMD, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=2400)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    return log


def test_smoke_real_pipeline_runs_every_stage(tmp_path, shared_data):
    log = run_flow(tmp_path)
    ws = tmp_path / "runs" / "smoke_real"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    stages = dvc_stages(ws)
    assert {"prepare", "index", "sample", "sft", "rl", "evaluate"} <= set(stages)
    for stage in stages:
        assert f"Running stage '{stage}'" in log, stage

    # prepare: real MuSiQue train, real IRCoT eval, no eval question in train
    prepared = ws / "data" / "prepared"
    train = pd.read_parquet(prepared / "train.parquet")
    assert len(train) > 0 and set(train["dataset"]) == {"musique_dev"}
    assert len(pd.read_parquet(prepared / "eval.parquet")) == params["prepare"]["jsonl"]["eval"][0]["limit"]
    assert json.loads((prepared / "contamination.json").read_text())["eval"]["count"] == 0

    # sample: the evidence oracle kept trajectories whose every query brought its gold paragraph back
    stats = json.loads((ws / "data" / "sft" / "stats.json").read_text())
    oracle = stats["samplers"]["oracle"]
    assert oracle["kept"] > 0 and oracle["no_evidence"] == 0
    assert oracle["pass_rate"]["retrieval"] == 1.0 and 0 < oracle["evidence"]["gold_recall"] <= 1
    rows = [json.loads(line) for line in (ws / "data" / "sft" / "trajectories.jsonl").read_text().splitlines()]
    assert rows and all(r["retrievals"] >= 1 for r in rows if r["sampler"] == "oracle")

    # sft and rl: trained models; the main rl run memorizes with the oracle rewriter on real evidence
    for model in ("sft", "rl", *(f"rl_{name}" for name in params["rl_ablations"])):
        assert (ws / "models" / model / "config.json").is_file(), model
    assert params["rl"]["rewriter"] == "oracle" and params["rl"]["memorization"] is True

    # evaluate: every configured method scored on the real eval questions
    metrics = json.loads((ws / "reports" / "eval" / "metrics.json").read_text())
    scored = {m for per_dataset in metrics.values() for m in per_dataset}
    assert set(params["evaluate"]["methods"]) <= scored
