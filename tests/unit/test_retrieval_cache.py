"""The SQLite retrieval cache: hits / misses, one inner call per batch, determinism, concurrency."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import threading

import pytest

from searchrl.config import IndexCfg
from searchrl.data.schema import Passage
from searchrl.retrieval.base import Hit
from searchrl.retrieval.cache import CachedRetriever


class FakeRetriever:
    """Deterministic hits derived from the query text; records every batch it is asked."""

    def __init__(self, manifest_hash: str = "abc123"):
        self.manifest_hash = manifest_hash
        self.calls: list[list[str]] = []

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        self.calls.append(list(queries))
        return [[Hit(f"{q}#{i}", f"title {i}", f"text of {q} {i} ü", 1.0 / (i + 1) + len(q) * 1e-7)
                 for i in range(k)] for q in queries]


def test_misses_are_searched_in_one_call_then_hit(tmp_path):
    inner = FakeRetriever()
    cache = CachedRetriever(inner, tmp_path / "c.sqlite")
    first = cache.search(["a", "b", "a", "c"], k=2)
    assert inner.calls == [["a", "b", "c"]]  # one call, unique misses, first-seen order
    assert [hs[0].id for hs in first] == ["a#0", "b#0", "a#0", "c#0"]
    assert (cache.hits, cache.misses) == (1, 3)

    second = cache.search(["c", "a", "b"], k=2)
    assert len(inner.calls) == 1 and second == [first[3], first[0], first[1]]
    mixed = cache.search(["b", "new1", "a", "new2"], k=2)
    assert inner.calls[-1] == ["new1", "new2"]
    assert [hs[0].id for hs in mixed] == ["b#0", "new1#0", "a#0", "new2#0"]
    assert len(cache) == 5


def test_replay_is_exact_across_instances(tmp_path):
    path = tmp_path / "c.sqlite"
    live = CachedRetriever(FakeRetriever(), path).search(["q1", "q2"], k=3)
    replay_inner = FakeRetriever()
    replay = CachedRetriever(replay_inner, path).search(["q1", "q2"], k=3)
    assert replay == live and replay_inner.calls == []  # exact Hits, scores bit for bit
    assert replay[0][0].text == "text of q1 0 ü"


def test_key_includes_k_and_manifest_hash(tmp_path):
    path = tmp_path / "c.sqlite"
    inner = FakeRetriever("index-A")
    cache = CachedRetriever(inner, path)
    cache.search(["q"], k=3)
    cache.search(["q"], k=5)
    assert len(inner.calls) == 2 and len(cache.search(["q"], k=5)[0]) == 5
    other = FakeRetriever("index-B")  # a rebuilt / re-configured index never sees stale hits
    CachedRetriever(other, path).search(["q"], k=3)
    assert other.calls == [["q"]]


def test_empty_batch_and_bad_k(tmp_path):
    inner = FakeRetriever()
    cache = CachedRetriever(inner, tmp_path / "c.sqlite")
    assert cache.search([], k=3) == [] and inner.calls == []
    with pytest.raises(ValueError):
        cache.search(["q"], k=0)


def test_many_queries_span_several_select_chunks(tmp_path):
    cache = CachedRetriever(FakeRetriever(), tmp_path / "c.sqlite")
    queries = [f"q{i}" for i in range(1234)]
    assert [hs[0].id for hs in cache.search(queries, k=1)] == [f"{q}#0" for q in queries]
    assert cache.retriever.calls == [queries]
    assert [hs[0].id for hs in cache.search(queries, k=1)] == [f"{q}#0" for q in queries]
    assert len(cache.retriever.calls) == 1


def test_threads_share_one_cache(tmp_path):
    inner = FakeRetriever()
    cache = CachedRetriever(inner, tmp_path / "c.sqlite")
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(20):
                hits = cache.search([f"q{(i + j) % 25}", f"q{j}"], k=2)
                assert hits[1][0].id == f"q{j}#0"
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) == 25


def _process_worker(path: str, start: int) -> None:
    cache = CachedRetriever(FakeRetriever(), path)
    for j in range(30):
        cache.search([f"q{(start + j) % 40}", f"shared{j % 5}"], k=2)


def test_processes_write_one_cache(tmp_path):
    path = tmp_path / "c.sqlite"
    CachedRetriever(FakeRetriever(), path)  # create the schema first
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_process_worker, args=(str(path), i * 10)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    rows = sqlite3.connect(path).execute("SELECT COUNT(*), COUNT(DISTINCT query) FROM hits").fetchone()
    assert rows == (45, 45)


def test_for_index_loads_the_index_only_on_a_miss(tmp_path, monkeypatch):
    from searchrl.retrieval import index as ix

    ix.build_index([Passage(f"p{i}", f"T{i}", f"word{i} common text") for i in range(6)], IndexCfg(kind="bm25"),
                   tmp_path / "bm25", progress=False)
    loads = []
    real_load = ix.load_index
    monkeypatch.setattr(ix, "load_index", lambda *a, **kw: loads.append(1) or real_load(*a, **kw))

    path = tmp_path / "c.sqlite"
    cache = CachedRetriever.for_index(tmp_path / "bm25", path)
    live = cache.search(["word3", "word5 common"], k=2)
    assert loads == [1] and live[0][0].id == "p3"
    assert cache.manifest_hash == real_load(tmp_path / "bm25").manifest_hash

    replay = CachedRetriever.for_index(tmp_path / "bm25", path)
    assert replay.search(["word5 common", "word3"], k=2) == [live[1], live[0]]
    assert loads == [1]  # all hits: the index was never opened


def test_needs_a_retriever_or_a_loader(tmp_path):
    with pytest.raises(ValueError):
        CachedRetriever(None, tmp_path / "c.sqlite")
