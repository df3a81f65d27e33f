"""The prepare stage end to end: sources -> finish -> validation -> published files."""

from __future__ import annotations

import json
import numbers
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import tasks.prepare as stage
from searchrl.config import Params, deep_merge, load_params, load_yaml, validate
from searchrl.data import knowledge_world as kw
from searchrl.data.prepare import load_source, prepare_data, write_outputs
from searchrl.data.schema import read_corpus, read_qa
from searchrl.errors import DataValidationError, InputError

ROOT = Path(__file__).resolve().parents[2]


def params(overlay: dict | None = None) -> Params:
    return validate(deep_merge(load_yaml(ROOT / "params.yaml"), overlay or {}))


NO_PROBE = {"prepare": {"knowledge_world": {"probe": {"enabled": False}}}}


def capital_oracle(calls: list):
    capitals = {f"What is the capital of {'the ' * (c.name in kw.ARTICLE_COUNTRIES)}{c.name}?": c.capital[0]
                for c in kw.COUNTRIES}

    def answer_fn(questions):
        calls.append(len(questions))
        return [capitals.get(q, "no idea") for q in questions]

    return answer_fn


def numbers_only(d) -> bool:
    if isinstance(d, dict):
        return all(numbers_only(v) for v in d.values())
    return isinstance(d, numbers.Number)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- knowledge world
def test_knowledge_world_stage_validates_and_publishes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stats = stage.prepare(params(NO_PROBE))
    out = tmp_path / "data" / "prepared"
    assert sorted(p.name for p in out.iterdir()) == [
        "contamination.json", "corpus.parquet", "eval.parquet", "seen.parquet", "stats.json", "train.parquet"]
    train, evals, seen = (read_qa(out / f"{s}.parquet") for s in ("train", "eval", "seen"))
    corpus = read_corpus(out / "corpus.parquet")
    assert (len(train), len(evals), len(seen)) == (240, 120, 60)
    assert train[0].metadata["hops"] and {r.split for r in seen} == {"seen"}
    ids = {p.id for p in corpus}
    assert all(set(r.metadata["gold_passage_ids"]) <= ids for r in train + evals + seen)
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats)) and numbers_only(on_disk)
    assert on_disk["train"]["qtype"]["comparison"] == 40 and on_disk["corpus"]["n"] == len(corpus)
    assert on_disk["probe"] == {"enabled": 0, "n_facts": 4 * len(kw.COUNTRIES), "n_known": 0, "known_rate": 0.0}
    assert on_disk["contamination"] == {"eval": 0, "seen": 0}
    assert json.loads((out / "contamination.json").read_text())["eval"]["count"] == 0
    assert {p.name for p in (tmp_path / "reports" / "validation").iterdir()} >= {
        "train.json", "eval.json", "seen.json", "corpus.json"}
    # deterministic: a rerun publishes identical data
    before = {s: pd.read_parquet(out / f"{s}.parquet") for s in ("train", "eval", "seen", "corpus")}
    stage.prepare(params(NO_PROBE))
    for s, df in before.items():
        pd.testing.assert_frame_equal(df, pd.read_parquet(out / f"{s}.parquet"))


def test_probe_runs_through_the_stage_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls: list = []
    monkeypatch.setattr(stage, "policy_answer_fn", lambda p: (capital_oracle(calls), "prompt-v1"))
    stats = stage.prepare(params())  # probe enabled (params.yaml default)
    assert stats["probe"]["enabled"] == 1 and stats["probe"]["known_rate"] == 0.25
    assert calls == [4 * len(kw.COUNTRIES)]
    assert (tmp_path / "data" / "cache" / "probe.json").exists()
    train = read_qa(tmp_path / "data" / "prepared" / "train.parquet")
    capital_hops = [h for r in train for h in r.metadata["hops"] if h["relation"] == "capital"]
    assert capital_hops and all(h["source"] == "internal" for h in capital_hops)
    stage.prepare(params())
    assert calls == [4 * len(kw.COUNTRIES)]  # second run: answered from the cache


def test_validation_failure_publishes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def reject(df, kind, name, **options):
        if name == "corpus":
            raise DataValidationError("corpus 'corpus' failed validation")

    monkeypatch.setattr(stage, "validate_frame", reject)
    with pytest.raises(DataValidationError):
        stage.prepare(params(NO_PROBE))
    assert not (tmp_path / "data" / "prepared").exists()


# ----------------------------------------------------------------------------- jsonl source
@pytest.fixture
def jsonl_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"idx": 1, "question": "Who wrote Hamlet?", "answer": "Shakespeare"},
        {"idx": 2, "question": "Who wrote  hamlet", "answer": "shakespeare"},  # duplicate after normalising
        {"idx": 3, "question": "What position did the actress hold?", "answer": "Chief of Protocol"},
        {"idx": 4, "question": "Capital of Norway?", "answer": "Oslo"},
    ])
    evals = write_jsonl(tmp_path / "dev_ircot.jsonl", [
        {"question_id": "q1", "question_text": "What position did the actress hold?",  # also in train
         "answers_objects": [{"spans": ["Chief of Protocol"]}],
         "contexts": [{"id": "0", "title": "Shirley Temple", "paragraph_text": "She was   Chief of Protocol.",
                       "is_supporting": True},
                      {"id": "1", "title": "Kiss and Tell", "paragraph_text": "A 1945 film.", "is_supporting": True}]},
        {"question_id": "q2", "question_text": "Which film?", "answers_objects": [{"spans": ["Kiss and Tell"]}],
         "contexts": [{"id": "0", "title": "Kiss and Tell", "paragraph_text": "A 1945 film.", "is_supporting": True}]},
    ])
    corpus = write_jsonl(tmp_path / "wiki.jsonl", [
        {"title": "Shirley Temple", "text": "She was Chief of Protocol."},  # same as a context, modulo spaces
        {"title": "Oslo", "text": "Oslo is the capital of Norway. " + " ".join(f"w{i}" for i in range(66))},
    ])
    return train, evals, corpus


def jsonl_params(train, evals, corpus, **extra) -> Params:
    return params({"prepare": {"source": "jsonl", "jsonl": {
        "train": [{"path": train, "dataset": "r1s"}], "eval": [{"path": evals, "dataset": "hotpotqa"}],
        "corpus": [{"path": corpus}], **extra}}})


def test_jsonl_source_dedupes_reports_contamination_and_publishes(tmp_path, monkeypatch, jsonl_files):
    monkeypatch.chdir(tmp_path)
    stats = stage.prepare(jsonl_params(*jsonl_files))
    out = tmp_path / "data" / "prepared"
    train, evals = read_qa(out / "train.parquet"), read_qa(out / "eval.parquet")
    corpus = read_corpus(out / "corpus.parquet")
    assert [r.id for r in train] == ["r1s-1", "r1s-3", "r1s-4"]
    assert [r.id for r in evals] == ["hotpotqa-q1", "hotpotqa-q2"]
    assert evals[0].metadata["gold_titles"] == ["Shirley Temple", "Kiss and Tell"]
    assert [p.title for p in corpus] == ["Shirley Temple", "Oslo", "Kiss and Tell"]  # files first, then contexts
    assert stats["duplicates_removed"] == {"train": 1, "eval": 0, "seen": 0, "corpus": 2}
    assert stats["contamination"] == {"eval": 1} and stats["seen"]["n"] == 0
    assert stats["corpus"]["source"] == {"wiki": 2, "hotpotqa": 1}
    report = json.loads((out / "contamination.json").read_text())
    assert report["eval"]["items"] == [{"id": "hotpotqa-q1", "question": "What position did the actress hold?",
                                        "train_ids": ["r1s-3"]}]
    assert read_qa(out / "seen.parquet") == []  # always written, empty outside the Knowledge World


def test_jsonl_chunking_and_no_contexts(jsonl_files):
    data = prepare_data(jsonl_params(*jsonl_files, chunk_words=30, corpus_from_contexts=False))
    assert [p.id.split("#")[-1] for p in data.corpus if p.title == "Oslo"] == ["0", "1", "2"]
    assert all(p.text.startswith(p.title + "   ") for p in data.corpus)
    assert "Kiss and Tell" not in {p.title for p in data.corpus}


def test_duplicate_ids_across_files_name_both_rows(tmp_path, jsonl_files):
    other = write_jsonl(tmp_path / "other.jsonl", [{"idx": 9, "question": "Q9?", "answer": "a"},
                                                   {"idx": 1, "question": "Different question?", "answer": "b"}])
    p = params({"prepare": {"source": "jsonl", "jsonl": {
        "train": [{"path": jsonl_files[0], "dataset": "r1s"}, {"path": other, "dataset": "r1s"}],
        "corpus": [{"path": jsonl_files[2]}]}}})
    with pytest.raises(InputError) as err:
        prepare_data(p)
    msg = str(err.value)
    assert "other.jsonl, line 2, field 'id': duplicate QA record id 'r1s-1'" in msg
    assert "train.jsonl, line 1" in msg


def test_empty_corpus_is_a_clear_error(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"idx": 1, "question": "Q?", "answer": "a"}])
    p = params({"prepare": {"source": "jsonl", "jsonl": {"train": [{"path": train}]}}})
    with pytest.raises(InputError, match=r"params.yaml, field 'prepare.jsonl.corpus': the corpus is empty"):
        load_source(p)


def test_a_qa_file_listed_as_corpus_contributes_its_paragraphs(jsonl_files):
    train, evals, _ = jsonl_files
    p = params({"prepare": {"source": "jsonl", "jsonl": {
        "train": [{"path": train}], "corpus": [{"path": evals}], "corpus_from_contexts": False}}})
    data = prepare_data(p)
    assert sorted(p.title for p in data.corpus) == ["Kiss and Tell", "Shirley Temple"]


# ----------------------------------------------------------------------------- hf source
def test_hf_source_with_local_dataset_and_corpus_file(tmp_path, monkeypatch, jsonl_files):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = [{"Question": "Who was president when Citibank was founded?", "Answer": "James Madison"}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "bamboogle"))
    spec = {"name": "bamboogle", "split": "test", "path": str(tmp_path / "bamboogle")}
    with pytest.raises(InputError, match="the corpus is empty"):
        load_source(params({"prepare": {"source": "hf", "hf": {"datasets": [spec]}}}))
    data = prepare_data(params({"prepare": {"source": "hf", "hf": {
        "datasets": [spec], "corpus": [{"path": jsonl_files[2]}]}}}))
    assert [r.id for r in data.eval] == ["bamboogle-1"] and len(data.corpus) == 2


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_stage_cli_reports_bad_input_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"idx": 1, "question": "Q?", "answer": "a"}\n{"idx": 2, "question": "Q2?"}\n', encoding="utf-8")
    raw = deep_merge(load_yaml(ROOT / "params.yaml"), {"prepare": {"source": "jsonl", "jsonl": {
        "train": [{"path": str(bad)}], "corpus": [{"path": str(bad)}]}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "SEARCHRL_ROOT": str(ROOT),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}, line 2, field 'answer': missing field" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "prepared").exists()


# ----------------------------------------------------------------------------- the real preset
@pytest.mark.shared_data
def test_hotpotqa_local_preset(shared_data, tmp_path):
    if shared_data.resolve() != (ROOT.parent / "shared" / "data").resolve():
        pytest.skip("the preset's paths point at ../shared/data; SEARCHRL_SHARED_DATA moved it")
    p = load_params(ROOT / "params.yaml", preset=ROOT / "configs" / "hotpotqa_local.yaml")
    data = prepare_data(p)
    assert (len(data.train), len(data.eval)) == (512, 500)
    titles = {x.title for x in data.corpus}
    gold = {t for r in data.eval for t in r.metadata["gold_titles"]}
    assert len(gold) > 900 and gold <= titles  # every gold paragraph of the IRCoT set is retrievable
    assert len(data.corpus) > 54_000 and data.stats["duplicates_removed"]["corpus"] > 0
    assert data.stats["contamination"]["eval"] == 0
    written = write_outputs(data, tmp_path / "prepared")
    assert len(pd.read_parquet(written["corpus"])) == len(data.corpus)
