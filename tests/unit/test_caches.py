"""Every cache is disposable: a damaged one is moved aside (named in a warning) and rebuilt, never a
traceback. The retrieval SQLite cache, the probe answers (JSON) and the token-length order (npy)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from searchrl.agent.fakes import KeywordRetriever
from searchrl.errors import ConfigError
from searchrl.judge import JudgeCache
from searchrl.retrieval.base import Hit
from searchrl.retrieval.cache import CachedRetriever
from searchrl.retrieval.replay import ReplayStore

GARBAGE = b"this is not a database, just bytes left by a crashed disk " * 40


class FakeRetriever:
    manifest_hash = "abc123"

    def __init__(self):
        self.calls = 0

    def search(self, queries, k):
        self.calls += 1
        return [[Hit(f"{q}#{i}", "t", f"text {q}", 1.0 / (i + 1)) for i in range(k)] for q in queries]


def damaged(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.damaged-*"))


def test_retrieval_cache_that_is_not_a_database_is_moved_aside_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "cache" / "retrieval.sqlite"
    path.parent.mkdir()
    path.write_bytes(GARBAGE)
    with caplog.at_level(logging.WARNING):
        cache = CachedRetriever(FakeRetriever(), path)
    [aside] = damaged(path)
    assert aside.read_bytes() == GARBAGE  # kept for inspection, not deleted
    assert str(path) in caplog.text and aside.name in caplog.text
    first = cache.search(["q1", "q2"], k=2)
    replay = CachedRetriever(FakeRetriever(), path)
    assert replay.search(["q1", "q2"], k=2) == first and replay.retriever.calls == 0  # a working cache again


def _open_and_search(path: str) -> None:
    CachedRetriever(FakeRetriever(), path).search(["shared"], k=1)


def test_processes_meeting_one_damaged_cache_rebuild_it_once(tmp_path):
    path = tmp_path / "retrieval.sqlite"
    path.write_bytes(GARBAGE)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_open_and_search, args=(str(path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(damaged(path)) == 1  # nobody moved another's fresh cache aside
    assert len(CachedRetriever(FakeRetriever(), path)) == 1


def test_probe_cache_that_is_not_json_is_moved_aside_and_rebuilt(tmp_path, caplog):
    from searchrl.data.knowledge_world import ProbeItem, probe

    path = tmp_path / "probe.json"
    path.write_text('{"version": 1, "entries": {', encoding="utf-8")
    items = [ProbeItem("f1", "Capital of France?", ["Paris"]), ProbeItem("f2", "Capital of Peru?", ["Lima"])]
    asked = []

    def answer(questions):
        asked.append(list(questions))
        return ["Paris", "Quito"]

    with caplog.at_level(logging.WARNING):
        result = probe(items, answer, cache_path=path, model_name="m")
    assert result.known == {"f1": True, "f2": False} and len(asked) == 1
    [aside] = damaged(path)
    assert aside.read_text() == '{"version": 1, "entries": {'
    assert str(path) in caplog.text
    assert json.loads(path.read_text())["entries"]  # rebuilt
    assert probe(items, answer, cache_path=path, model_name="m").cached and len(asked) == 1


def test_token_order_cache_that_is_damaged_is_moved_aside_and_recounted(tmp_path, caplog):
    from searchrl.retrieval.index import encode_order

    class Lengths:
        max_length = 256

        def token_lengths(self, texts):
            return np.array([len(t.split()) for t in texts])

    texts = ["a b c", "a", "a b c d e", "a b"]
    path = tmp_path / "order.npy"
    path.write_bytes(b"\x93NUMPY garbage")
    with caplog.at_level(logging.WARNING):
        order = encode_order(texts, Lengths(), path)
    assert order.tolist() == [2, 0, 3, 1]
    assert len(damaged(path)) == 1 and str(path) in caplog.text
    assert np.load(path).tolist() == [2, 0, 3, 1]


# ----------------------------------------------------------------------------- unusable paths
# A cache or store path that cannot be a database file is one line naming the key and the path, at
# params load and when the store opens (it was `sqlite3.OperationalError: unable to open database file`,
# no path, from deep inside a stage; the judge cache even moved the directory aside as "damaged").
def test_a_directory_as_a_cache_path_is_one_line_naming_the_key(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    retriever = KeywordRetriever([("p1", "T", "some text")])
    for make, key in ((lambda: CachedRetriever(retriever, folder), "agent.cache_path"),
                      (lambda: JudgeCache(folder), "evaluate.judge.cache_path"),
                      (lambda: ReplayStore(folder), "retrieval.web.replay_path")):
        with pytest.raises(ConfigError) as err:
            make()
        assert str(err.value).startswith(f"{key}: '{folder}' is a directory")
        assert folder.is_dir() and not list(folder.iterdir())  # nothing moved aside, nothing written


def test_a_cache_under_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"^agent.cache_path: cannot open .*not_a_dir/retrieval.sqlite"):
        CachedRetriever(KeywordRetriever([("p1", "T", "t")]), blocker / "retrieval.sqlite")


def test_params_with_a_directory_as_cache_path_fail_at_load(tmp_path, monkeypatch):
    from searchrl.config import load_params
    from tests.conftest import PROJECT_ROOT

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cache").mkdir(parents=True)
    with pytest.raises(Exception, match="agent.cache_path.*is a directory"):
        load_params(PROJECT_ROOT / "params.yaml", overrides=["agent.cache_path=data/cache"])
