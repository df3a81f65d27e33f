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


# The toy jsonl files below have answers only: the oracle sampler / rewriter (which need gold evidence) would
# fail the start-up check (searchrl.config.Params._check_oracle_evidence), and prepare does not use them.
NO_ORACLE = {"sample": {"sampler": ["policy"]}, "rl": {"rewriter": "policy"}}


def params(overlay: dict | None = None) -> Params:
    return validate(deep_merge(deep_merge(load_yaml(ROOT / "params.yaml"), NO_ORACLE), overlay or {}))


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
        "train": [{"path": train}], "eval": [{"path": train, "dataset": "e"}], "corpus": [{"path": evals}],
        "corpus_from_contexts": False}}})
    data = prepare_data(p)
    assert sorted(p.title for p in data.corpus) == ["Kiss and Tell", "Shirley Temple"]


def test_empty_eval_split_fails_prepare_at_once(tmp_path, jsonl_files):
    """Issue 11 item 8: a jsonl source without an eval file used to pass prepare as "eval 0" and fail
    later (evaluate) with nine misleading column errors."""
    train, _, corpus = jsonl_files
    p = params({"prepare": {"source": "jsonl", "jsonl": {"train": [{"path": train}], "corpus": [{"path": corpus}]}}})
    with pytest.raises(InputError) as err:
        prepare_data(p)
    assert str(err.value).startswith("params.yaml, field 'prepare.jsonl.eval (no files listed)': eval split is empty")
    assert "\n" not in str(err.value)
    # listed, but every row skipped (MuSiQue's unanswerable questions): still empty, the file is named
    unanswerable = write_jsonl(tmp_path / "musique.jsonl", [{"id": "m1", "question": "Q?", "answer": "a",
                                                             "answerable": False, "paragraphs": []}])
    p = params({"prepare": {"source": "jsonl", "jsonl": {
        "train": [{"path": train}], "eval": [{"path": unanswerable}], "corpus": [{"path": corpus}]}}})
    with pytest.raises(InputError, match=rf"field 'prepare.jsonl.eval \({unanswerable}\)': eval split is empty"):
        prepare_data(p)


def test_empty_train_split_fails_only_where_the_pipeline_trains(jsonl_files):
    _, evals, corpus = jsonl_files
    source = {"source": "jsonl", "jsonl": {"eval": [{"path": evals}], "corpus": [{"path": corpus}]}}
    with pytest.raises(InputError, match=r"prepare.jsonl.train \(no files listed\)': train split is empty "
                                         r"\(evaluate.methods sft, rl"):
        prepare_data(params({"prepare": source}))  # params.yaml evaluates sft and rl models
    data = prepare_data(params({"prepare": source, "evaluate": {"methods": ["direct", "agent_r1searcher"]}}))
    assert data.train == [] and len(data.eval) == 2


def test_sample_stage_names_an_empty_train_split(tmp_path):
    """The first stage that reads train.parquet (prepared when no trained method was evaluated) stops
    with one line naming it, before loading an index or a model."""
    import tasks.sample
    from searchrl.data.schema import qa_frame

    qa_frame([]).to_parquet(tmp_path / "train.parquet", index=False)
    p = params({"prepare": {"out_dir": str(tmp_path)}, "index": {"out_dir": str(tmp_path / "no-index")}})
    with pytest.raises(InputError, match=rf"{tmp_path / 'train.parquet'}: train split is empty"):
        tasks.sample.sample(p)


def test_prepared_files_with_blank_or_non_text_values_are_named(tmp_path):
    """The readers of prepared parquet files apply the same rules as the source readers."""
    from searchrl.data.schema import QA_COLUMNS

    row = {"id": "a", "dataset": "d", "split": "eval", "question": "Q?", "answers": ["x"], "metadata": "{}"}
    for bad, message in (({"question": " \u200b"}, "row 2: empty question"),
                         ({"answers": ["x", None]}, "row 2: expected a string answer, got null"),
                         ({"answers": [" "]}, "row 2: blank answer")):
        path = tmp_path / "qa.parquet"
        pd.DataFrame([row, {**row, "id": "b", **bad}], columns=QA_COLUMNS).to_parquet(path, index=False)
        with pytest.raises(InputError, match=rf"qa.parquet, field '(question|answers)': {message}"):
            read_qa(path)
    corpus = tmp_path / "corpus.parquet"
    pd.DataFrame({"id": ["p"], "title": ["T"], "text": ["\ufeff\n"], "source": ["s"]}).to_parquet(corpus)
    with pytest.raises(InputError, match=r"corpus.parquet, field 'text': row 1: empty passage text"):
        read_corpus(corpus)


# ----------------------------------------------------------------------------- hf source
def test_hf_source_with_local_dataset_and_corpus_file(tmp_path, monkeypatch, jsonl_files):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = [{"Question": "Who was president when Citibank was founded?", "Answer": "James Madison"}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "bamboogle"))
    spec = {"name": "bamboogle", "split": "test", "path": str(tmp_path / "bamboogle")}
    with pytest.raises(InputError, match="the corpus is empty"):
        load_source(params({"prepare": {"source": "hf", "hf": {"datasets": [spec]}}}))
    source = {"source": "hf", "hf": {"datasets": [spec], "corpus": [{"path": jsonl_files[2]}]}}
    data = prepare_data(params({"prepare": source, "evaluate": {"methods": ["direct", "rag"]}}))
    assert [r.id for r in data.eval] == ["bamboogle-1"] and len(data.corpus) == 2
    # evaluating trained models needs a training set: no dataset with role: train fails at once
    with pytest.raises(InputError, match=r"field 'prepare.hf.datasets with role: train \(no datasets\)': "
                                         r"train split is empty \(evaluate.methods sft, rl"):
        prepare_data(params({"prepare": source}))


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_stage_cli_reports_bad_input_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"idx": 1, "question": "Q?", "answer": "a"}\n{"idx": 2, "question": "Q2?"}\n', encoding="utf-8")
    raw = deep_merge(deep_merge(load_yaml(ROOT / "params.yaml"), NO_ORACLE), {"prepare": {"source": "jsonl", "jsonl": {
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
    # train: the 2,417 MuSiQue-Ans dev questions less 9 duplicates, each with its gold decomposition
    assert (len(data.train), len(data.eval)) == (2408, 500)
    assert all(r.metadata["decomposition"] for r in data.train)
    titles = {x.title for x in data.corpus}
    gold = {t for r in data.eval for t in r.metadata["gold_titles"]}
    assert len(gold) > 900 and gold <= titles  # every gold paragraph of the IRCoT set is retrievable
    assert len(data.corpus) > 54_000 and data.stats["duplicates_removed"]["corpus"] > 0
    assert data.stats["contamination"]["eval"] == 0
    written = write_outputs(data, tmp_path / "prepared")
    assert len(pd.read_parquet(written["corpus"])) == len(data.corpus)
