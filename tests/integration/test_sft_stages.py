"""The sample and sft stages end to end through `run_stage` (params, MLflow run, validation gate,
published outputs), on a tiny Knowledge World with a tiny llama policy (random weights, the real
SmolLM2 tokenizer) and a BM25 index."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

import tasks.prepare
import tasks.sample
import tasks.sft
from searchrl.config import load_params, load_yaml
from searchrl.models import load_tokenizer
from searchrl.stage import run_stage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    policy = tmp_path / "tiny-policy"
    LlamaForCausalLM(cfg).save_pretrained(policy)
    tok.save_pretrained(policy)

    params = load_yaml(ROOT / "params.yaml")
    params["policy"]["model"] = str(policy)
    params["tracking"]["experiment"] = "test-sft-stages"
    kw = params["prepare"]["knowledge_world"]
    kw.update(n_people=8, n_companies=4, n_works=4, n_countries=6, n_train=16, n_eval=8, n_seen=4)
    kw["probe"]["cache_path"] = "data/cache/probe.json"
    params["index"]["kind"] = "bm25"
    params["agent"].update(max_segment_tokens=48, max_total_tokens=512)
    params["sample"].update(sampler=["policy", "oracle"], n_samples=2, max_questions=8, model_max_questions=3,
                            keep_per_question=1)
    params["sft"].update(epochs=1, batch_size=4, micro_batch_size=2, lr=1e-3, save_steps=1, max_length=1024)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("SEARCHRL_ROOT", str(tmp_path))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "SEARCHRL_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    run_stage("prepare", tasks.prepare.prepare)
    from searchrl.retrieval.index import build_index

    p = load_params()
    build_index(Path(p.prepare.out_dir) / "corpus.parquet", p.index, p.index.out_dir)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_sample_then_sft(workspace):
    run_stage("sample", tasks.sample.sample)
    out = workspace / "data" / "sft"
    lines = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samplers"]["policy"]["candidates"] == 6  # 3 questions x 2 samples
    assert stats["samplers"]["oracle"]["questions"] >= 8 - stats["samplers"]["policy"]["kept"]
    assert len(lines) == stats["kept"] >= 6
    assert {x["sampler"] for x in lines} <= {"policy", "oracle"}
    assert all(x["segments"] and x["answer"] for x in lines)
    difficulty = pd.read_parquet(out / "difficulty.parquet")
    assert len(difficulty) == 16 and (difficulty["difficulty"] != "unknown").sum() == 3
    report = json.loads((workspace / "reports" / "validation" / "sft_trajectories.json").read_text())
    assert report["success"] and report["n_rows"] == len(lines)

    run_stage("sft", tasks.sft.sft)
    model_dir = workspace / "models" / "sft"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer_config.json").exists()
    assert not (workspace / "models" / ".sft-checkpoints").exists()  # removed once published
    metrics = json.loads((workspace / "reports" / "sft" / "metrics.json").read_text())
    assert metrics["examples"] == len(lines) and metrics["steps"] >= 1
    curve = pd.read_csv(workspace / "reports" / "sft" / "loss.csv")
    assert list(curve.columns) == ["step", "epoch", "loss", "learning_rate"] and len(curve) == metrics["steps"]
    assert (workspace / "reports" / "sft" / "loss.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    version = client.get_model_version_by_alias("searchrl-policy", "sft")
    run = client.get_run(version.tags["run_id"])
    assert run.data.tags["stage"] == "sft" and run.info.status == "FINISHED"
    assert run.data.params["sft.epochs"] == "1.0" and "learning_rate" in run.data.params  # ours + the trainer's
    assert len(client.get_metric_history(run.info.run_id, "loss")) == metrics["steps"]  # the loss curve
    sample_run = client.search_runs([run.info.experiment_id], "tags.stage = 'sample'")[0]
    assert sample_run.data.metrics["sample.samplers.oracle.acceptance"] > 0


def test_failed_validation_publishes_nothing(workspace, monkeypatch):
    """A kept trajectory the Great Expectations suite rejects (a document block with no query before
    it) stops the stage before anything is written."""
    from searchrl.agent.trajectory import Segment, Trajectory
    from searchrl.errors import DataValidationError
    from searchrl.training import sampling

    text = "\n<document>\n(1) forged\n</document>\n"
    traj = Trajectory("kw-train-00000", "q?", "r1searcher_pp", "p", [1], [
        Segment("env", text, [1, 2, 3]), Segment("model", "<answer>x</answer>", [4, 5], [0.0, 0.0])],
        answer="x", finish_reason="answered")
    bad = sampling.Candidate(traj, "policy", {"format": True})
    monkeypatch.setattr(sampling, "run_sampling", lambda *a, **k: sampling.SamplingResult([bad], [], {
        "samplers": {}, "kept": 1, "questions_covered": 1, "mix": {}, "difficulty": {}}))
    with pytest.raises(DataValidationError, match="must follow a </external>"):
        tasks.sample.sample(load_params())
    assert not (workspace / "data" / "sft").exists()
    report = json.loads((workspace / "reports" / "validation" / "sft_trajectories.json").read_text())
    assert report["success"] is False
