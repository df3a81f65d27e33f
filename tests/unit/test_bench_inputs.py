"""Benchmarks build or verify exactly the input they report: bench_search.py never measures whatever
index an earlier benchmark left in its folder (it did: 4,096 or ~55k paragraphs where the result said
8,192)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow  # loads the embedded MiniLM encoder


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"title": f"Title {i}", "text": f"Paragraph number {i} about topic {i % 3}."} for i in range(12)]
    (folder / "wiki.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_bench_search_builds_then_verifies_exactly_its_input(corpus_dir, tmp_path):
    import bench_search

    index_dir = tmp_path / "index"
    first = bench_search.ensure_index(index_dir, corpus_dir, limit=8, seed=0)
    assert first["index_built_here"] and first["passages"] == 8
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["n_passages"] == 8 and manifest["corpus_hash"] == first["corpus_hash"]

    again = bench_search.ensure_index(index_dir, corpus_dir, limit=8, seed=0)  # the same input: reused
    assert not again["index_built_here"] and again["corpus_hash"] == first["corpus_hash"]

    # what an earlier benchmark left in the folder (another sample, another size) is rebuilt, not measured
    other_seed = bench_search.ensure_index(index_dir, corpus_dir, limit=8, seed=1)
    assert other_seed["index_built_here"] and other_seed["corpus_hash"] != first["corpus_hash"]
    everything = bench_search.ensure_index(index_dir, corpus_dir, limit=0, seed=0)
    assert everything["index_built_here"] and everything["passages"] == 12
    assert json.loads((index_dir / "manifest.json").read_text())["n_passages"] == 12


def test_the_recorded_search_result_names_its_input():
    """bench/results/search.json was measured on the default input, and says which: the 8,192-paragraph
    seed-0 sample, the index's corpus hash equal to that sample's."""
    import bench_search

    recorded = json.loads((ROOT / "bench" / "results" / "search.json").read_text())
    assert recorded["command"].startswith("python bench/bench_search.py")
    assert "--limit" not in recorded["command"] and "--seed" not in recorded["command"]
    corpus = recorded["corpus"]
    assert (corpus["limit"], corpus["seed"], corpus["passages"]) == (bench_search.DEFAULT_LIMIT, 0, bench_search.DEFAULT_LIMIT)
    assert recorded["index"]["passages"] == corpus["passages"]
    assert recorded["index"]["corpus_hash"] == corpus["corpus_hash"]


@pytest.mark.shared_data
def test_the_recorded_corpus_hash_is_the_default_sample_of_the_shared_corpus(shared_data):
    import bench_search
    from bench_index import load_corpus

    from searchrl.retrieval.index import corpus_hash, read_passages

    recorded = json.loads((ROOT / "bench" / "results" / "search.json").read_text())
    sample = load_corpus(shared_data / "corpus", bench_search.DEFAULT_LIMIT, 0)
    assert corpus_hash(read_passages(sample)) == recorded["corpus"]["corpus_hash"]


def test_preset_run_reads_each_stage_time_from_the_flow_log():
    """Stage seconds from the Prefect task lines: the last attempt of a retried stage counts, a stage
    that never finished is left out, a run past midnight wraps."""
    import preset_run

    log = "\n".join([
        "23:59:50.000 | INFO    | Task run 'dvc-repro-sft' - Running stage 'sft':",
        "00:00:20.500 | INFO    | Task run 'dvc-repro-sft' - Finished in state Completed()",
        "00:00:21.000 | INFO    | Task run 'dvc-repro-rl' - Running stage 'rl':",
        "00:01:00.000 | INFO    | Task run 'dvc-repro-rl' - Task run failed with exception: StageFailed(...)",
        "00:01:05.000 | INFO    | Task run 'dvc-repro-rl' - Running stage 'rl':",
        "00:02:05.000 | INFO    | Task run 'dvc-repro-rl' - Finished in state Completed()",
        "00:02:06.000 | INFO    | Task run 'dvc-repro-rl_ablation@x' - Running stage 'rl_ablation@x':",
    ])
    assert preset_run.stage_seconds(log) == {"sft": 30.5, "rl": 60.0}


def test_memory_is_attributed_to_the_dvc_stage_a_process_runs():
    """Processes are named after the DVC stage of dvc.yaml they run (the launcher, the task itself, an
    RL ablation), and only those: the flow, DVC and the Prefect server belong to no stage."""
    from smoke_footprint import stage_of

    py = "/x/.venv/bin/python"
    assert stage_of([py, "-m", "tasks.sft"]) == "sft"
    assert stage_of([py, "-m", "searchrl.launch", "tasks.rl"]) == "rl"
    assert stage_of([py, "-m", "tasks.rl", "--ablation", "no_memorization"]) == "rl_ablation@no_memorization"
    assert stage_of([py, "-m", "searchrl.launch", "tasks.rl", "--ablation", "r1searcher"]) == "rl_ablation@r1searcher"
    assert stage_of([py, "-m", "tasks.rl", "--ablation"]) == "rl"
    assert stage_of([py, "-m", "flows.pipeline", "--stages", "sft"]) is None
    assert stage_of([py, "-m", "searchrl.runcache", "repro", "sft"]) is None
    assert stage_of([]) is None
