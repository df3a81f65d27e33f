"""The retrieval server (searchrl/retrieval/serve.py) in process, over the keyword retriever: our
/search, Search-R1's /retrieve shape, health while loading, bad requests, fault injection; and the
request coalescer (searchrl/retrieval/batching.py) on its own."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from fastapi.testclient import TestClient

from searchrl.agent.fakes import KeywordRetriever
from searchrl.retrieval.batching import Coalescer, Overloaded
from searchrl.retrieval.serve import ServerSettings, ServerState, create_app

PASSAGES = [("p1", "Talo Vesk", "Talo Vesk is a chemist who was born in Peru."),
            ("p2", "Mira Sol", "Mira Sol works for Bantex Labs."),
            ("p3", "France", "France is a country in Europe. Its capital city is Paris."),
            ("p4", "Bantex Labs", "Bantex Labs was founded in 1987.")]


def client(**settings) -> tuple[TestClient, ServerState, KeywordRetriever]:
    retriever = KeywordRetriever(PASSAGES)
    state = ServerState(ServerSettings(**settings))
    state.ready(retriever, manifest={"kind": "keyword"})
    return TestClient(create_app(state)), state, retriever


# ----------------------------------------------------------------------------- /search
def test_search_returns_the_in_process_hits_with_the_manifest_hash():
    c, _, retriever = client()
    queries = ["where was Talo Vesk born", "capital of France", "where was Talo Vesk born"]
    r = c.post("/search", json={"queries": queries, "k": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["manifest_hash"] == retriever.manifest_hash and body["k"] == 2
    want = KeywordRetriever(PASSAGES).search(queries, 2)
    assert [[(h["id"], h["title"], h["text"], h["score"]) for h in row] for row in body["hits"]] == \
        [[(h.id, h.title, h.text, h.score) for h in row] for row in want]
    assert retriever.calls == [["where was Talo Vesk born", "capital of France"]]  # duplicates searched once


def test_health_and_manifest_wait_for_the_index():
    state = ServerState()
    c = TestClient(create_app(state))
    assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "loading"
    for r in (c.get("/manifest"), c.post("/search", json={"queries": ["x"], "k": 1}),
              c.post("/retrieve", json={"queries": ["x"]})):
        assert r.status_code == 503 and r.headers["retry-after"] and "loading" in r.json()["detail"]
    state.ready(KeywordRetriever(PASSAGES), manifest={"kind": "keyword", "n_passages": 4})
    h = c.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["passages"] is None
    m = c.get("/manifest").json()
    assert m["manifest_hash"] == "keyword-retriever" and m["manifest"]["n_passages"] == 4
    assert m["server"]["max_batch"] == 64 and "fail_seed" not in m["server"]
    state.close()


# ----------------------------------------------------------------------------- Search-R1's /retrieve
def passages2string(retrieval_result: list) -> str:
    """Search-R1's client (search_r1/llm_agent/generation.py `_passages2string`), verbatim logic."""
    format_reference = ""
    for idx, doc_item in enumerate(retrieval_result):
        content = doc_item["document"]["contents"]
        title = content.split("\n")[0]
        text = "\n".join(content.split("\n")[1:])
        format_reference += f"Doc {idx + 1}(Title: {title}) {text}\n"
    return format_reference


def test_a_search_r1_client_request_is_answered_in_their_shape():
    c, _, _ = client()
    # the payload of Search-R1's search_r1/search/retrieval_request.py
    payload = {"queries": ["What is the capital of France?", "Explain neural networks."], "topk": 2,
               "return_scores": True}
    r = c.post("/retrieve", json=payload)
    assert r.status_code == 200 and list(r.json()) == ["result"]
    result = r.json()["result"]
    assert len(result) == 2 and all(len(row) == 2 for row in result)
    first = result[0][0]
    assert set(first) == {"document", "score"} and isinstance(first["score"], float)
    assert first["document"]["id"] == "p3" and first["document"]["contents"] == \
        '"France"\nFrance is a country in Europe. Its capital city is Paris.'
    assert passages2string(result[0]).startswith(
        'Doc 1(Title: "France") France is a country in Europe. Its capital city is Paris.\nDoc 2(Title: ')
    # return_scores false: the documents themselves; topk left out: the server's default (3, as theirs)
    plain = c.post("/retrieve", json={"queries": ["capital of France"]}).json()["result"]
    assert len(plain[0]) == 3 and plain[0][0]["id"] == "p3" and "score" not in plain[0][0]
    assert c.post("/retrieve", json={"queries": ["x"], "topk": None, "extra": 1}).status_code == 200


# ----------------------------------------------------------------------------- bad requests
BAD = [
    ("k zero", {"queries": ["x"], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("k negative", {"queries": ["x"], "k": -3}, 422, "k: Input should be greater than or equal to 1"),
    ("k over 1000", {"queries": ["x"], "k": 1001}, 422, "k: Input should be less than or equal to 1000"),
    ("empty list", {"queries": [], "k": 3}, 422, "queries: List should have at least 1 item"),
    ("no queries", {"k": 3}, 422, "queries: Field required"),
    ("not strings", {"queries": [1, 2], "k": 3}, 422, "queries.0: Input should be a valid string"),
    ("typo", {"queries": ["x"], "topk": 3}, 422, "topk: Extra inputs are not permitted"),
    ("not an object", ["x"], 422, "must be a JSON object"),
]


@pytest.mark.parametrize("name,body,status,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_search_requests_get_a_4xx_with_the_reason(name, body, status, reason):
    c, state, retriever = client()
    r = c.post("/search", json=body)
    assert r.status_code == status and reason in r.json()["detail"], r.json()
    assert retriever.calls == [] and state.rejected == 1
    assert c.post("/search", json={"queries": ["x"], "k": 1}).status_code == 200  # still serving


def test_bad_bodies_get_a_4xx_and_never_reach_the_index():
    c, state, retriever = client()
    ten_mb = b'{"queries": ["' + b"a" * (10 << 20) + b'"], "k": 3}'
    r = c.post("/search", content=ten_mb)
    assert r.status_code == 413 and "over this server's limit" in r.json()["detail"]
    r = c.post("/search", content=b'{"queries": ["caf\xe9"], "k": 3}')  # latin-1, not UTF-8
    assert r.status_code == 400 and r.json()["detail"].startswith("request body is not UTF-8 (byte 17")
    r = c.post("/search", content=b'{"queries": ["x"], "k": 3')
    assert r.status_code == 400 and r.json()["detail"].startswith("request body is not JSON")
    r = c.post("/search", content=b'{"queries": ["ok", "\\ud800"], "k": 3}')  # valid JSON, not text
    assert r.status_code == 400 and r.json()["detail"] == "queries.1: contains a lone UTF-16 surrogate (not text)"
    r = c.post("/retrieve", json={"queries": ["x"], "topk": 0})  # Search-R1 reads 0 as its default; we refuse
    assert r.status_code == 422 and "topk" in r.json()["detail"]
    assert retriever.calls == [] and state.rejected == 5
    c2, _, _ = client(max_queries=2, max_k=5)
    assert "at most 2 per request" in c2.post("/search", json={"queries": ["a", "b", "c"], "k": 1}).json()["detail"]
    assert "limit of 5" in c2.post("/search", json={"queries": ["a"], "k": 6}).json()["detail"]


def test_a_chunked_body_over_the_limit_is_refused_while_reading():
    c, _, _ = client(max_body_bytes=1000)

    def chunks():
        for _ in range(10):
            yield b" " * 500

    r = c.post("/search", content=chunks())  # no content-length: counted as it arrives
    assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]


# ----------------------------------------------------------------------------- faults
def test_fault_injection_answers_the_seeded_share_with_500():
    c, state, retriever = client(fail_rate=0.2, fail_seed=7)
    codes = [c.post("/search", json={"queries": [f"q{i}"], "k": 1}).status_code for i in range(200)]
    failed = codes.count(500)
    assert set(codes) == {200, 500} and 25 <= failed <= 55 and state.injected_faults == failed
    assert len(retriever.calls) == 200 - failed  # an injected fault answers before searching
    body = c.post("/search", json={"queries": ["x"], "k": 1})
    assert body.status_code in (200, 500)
    assert c.get("/stats").json()["injected_faults"] >= failed


def test_a_search_that_raises_is_a_500_and_the_server_goes_on():
    class Broken(KeywordRetriever):
        fail = True

        def search(self, queries, k):
            if self.fail:
                self.fail = False
                raise RuntimeError("faiss exploded")
            return super().search(queries, k)

    state = ServerState()
    state.ready(Broken(PASSAGES))
    c = TestClient(create_app(state))
    r = c.post("/search", json={"queries": ["x"], "k": 1})
    assert r.status_code == 500 and r.json()["detail"] == "search failed: RuntimeError: faiss exploded"
    assert c.post("/search", json={"queries": ["x"], "k": 1}).status_code == 200
    state.close()


# ----------------------------------------------------------------------------- coalescing
class SlowRetriever(KeywordRetriever):
    """The keyword retriever taking `delay` seconds per call (a busy index)."""

    def __init__(self, passages, delay: float):
        super().__init__(passages)
        self.delay = delay

    def search(self, queries, k):
        time.sleep(self.delay)
        return super().search(queries, k)


def test_concurrent_single_query_callers_share_batched_searches():
    retriever = SlowRetriever(PASSAGES, delay=0.05)
    co = Coalescer(retriever.search, max_batch=64, max_wait_s=0.01)
    queries = [f"Talo Vesk question {i}" for i in range(48)]
    results: dict[int, list] = {}

    def caller(i: int) -> None:
        results[i] = co.submit([queries[i]], 2).result(timeout=30)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    co.close()
    assert co.stats.requests == 48 and co.stats.queries == 48
    assert co.stats.searches <= 6  # about one batched search, not 48
    assert sum(len(c) for c in retriever.calls) == 48
    want = KeywordRetriever(PASSAGES).search(queries, 2)
    assert [results[i][0] for i in range(48)] == want  # every caller gets its own rows


def test_batches_respect_max_batch_and_never_mix_k():
    retriever = SlowRetriever(PASSAGES, delay=0.02)
    co = Coalescer(retriever.search, max_batch=4, max_wait_s=0.05)
    futs = [co.submit([f"q{i}"], 1 + i % 2) for i in range(12)] + [co.submit([f"big{j}" for j in range(9)], 1)]
    rows = [f.result(timeout=30) for f in futs]
    co.close()
    assert all(len(r) == 1 and len(r[0]) == 1 + i % 2 for i, r in enumerate(rows[:12]))
    assert len(rows[12]) == 9  # larger than max_batch: searched whole, alone
    assert max(len(c) for c in retriever.calls) == 9
    assert all(len(c) <= 4 for c in retriever.calls if not c[0].startswith("big"))
    assert co.stats.max_batch_queries == 9


def test_a_lone_request_waits_at_most_max_wait():
    co = Coalescer(KeywordRetriever(PASSAGES).search, max_batch=64, max_wait_s=0.05)
    t0 = time.perf_counter()
    co.submit(["Mira Sol"], 1).result(timeout=5)
    waited = time.perf_counter() - t0
    co.close()
    assert 0.04 <= waited < 1.0


def test_a_failing_search_fails_its_batch_only():
    calls = []

    def search(queries, k):
        calls.append(list(queries))
        if len(calls) == 1:
            raise ConnectionError("index gone")
        return [[] for _ in queries]

    co = Coalescer(search, max_batch=64, max_wait_s=0.0)
    with pytest.raises(ConnectionError, match="index gone"):
        co.submit(["a"], 1).result(timeout=5)
    assert co.submit(["b"], 1).result(timeout=5) == [[]]
    assert co.stats.failed_batches == 1
    co.close()


def test_overload_is_refused_and_close_fails_what_waits():
    gate = threading.Event()

    def search(queries, k):
        gate.wait(10)
        return [[] for _ in queries]

    co = Coalescer(search, max_batch=2, max_wait_s=0.0, max_pending=3)
    first = co.submit(["a", "b"], 1)  # taken by the worker, which blocks in search
    deadline = time.time() + 5
    while co.pending() and time.time() < deadline:
        time.sleep(0.01)
    queued = co.submit(["c", "d", "e"], 1)
    with pytest.raises(Overloaded, match="3 queries are waiting"):
        co.submit(["f"], 1)
    gate.set()
    assert first.result(timeout=5) == [[], []] and queued.result(timeout=5) == [[], [], []]
    co.close()
    with pytest.raises(RuntimeError, match="closed"):
        co.submit(["g"], 1)


def test_stats_endpoint_counts_batches():
    c, state, _ = client()
    for i in range(3):
        c.post("/search", json={"queries": [f"q{i}", "x"], "k": 1})
    s = c.get("/stats").json()
    assert s["ready"] and s["requests"] == 3 and s["queries"] == 6 and s["searches"] == 3
    assert json.loads(json.dumps(s)) == s
    state.close()


# ----------------------------------------------------------------------------- a real index, the CLI
def test_a_bm25_index_is_served_with_its_in_process_hits_and_hash(tmp_path):
    """The server's loader on a real bm25s index directory (no model needed): the same hits and
    manifest hash over HTTP as in process."""
    from searchrl.config import IndexCfg
    from searchrl.data.schema import Passage
    from searchrl.retrieval.index import build_index, load_index
    from searchrl.retrieval.serve import open_index

    build_index([Passage(pid, t, x, "test") for pid, t, x in PASSAGES], IndexCfg(kind="bm25"),
                tmp_path / "bm25", progress=False)
    state = ServerState()
    state.ready(open_index(str(tmp_path / "bm25")))
    c = TestClient(create_app(state))
    queries = ["where was Talo Vesk born", "Bantex Labs founded"]
    body = c.post("/search", json={"queries": queries, "k": 2}).json()
    local = load_index(tmp_path / "bm25")
    assert body["manifest_hash"] == local.manifest_hash
    assert [[h["id"] for h in row] for row in body["hits"]] == [[h.id for h in row] for row in local.search(queries, 2)]
    assert body["hits"][0][0]["id"] == "p1" and c.get("/manifest").json()["manifest"]["kind"] == "bm25"
    state.close()


def test_the_command_line_binds_loopback_and_sets_the_thread_count_it_was_given(monkeypatch):
    import faiss
    import torch

    from searchrl.retrieval import serve as srv

    seen = {}

    def fake_serve(state, host, port, loader=None, access_log=False):
        seen.update(host=host, port=port, threads=state.settings.threads)
        return 0

    monkeypatch.setattr(srv, "serve", fake_serve)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    try:
        assert srv.main(["--index", "unused", "--threads", "1"]) == 0
        assert seen == {"host": "127.0.0.1", "port": srv.DEFAULT_PORT, "threads": 1}
        assert faiss.omp_get_max_threads() == 1 and torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
    finally:  # this test process keeps its own thread counts
        faiss.omp_set_num_threads(before[0])
        torch.set_num_threads(before[1])
