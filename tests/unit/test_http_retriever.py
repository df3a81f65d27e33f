"""HTTPRetriever (searchrl/retrieval/http.py) against a live server in a thread: both APIs, the derived
identity of a foreign server, retries on 5xx / refused connections, no retry on 4xx, a manifest that
changes mid-run; and the factory's wiring (retrieval.url -> retries -> cache -> client)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import requests
import uvicorn

from searchrl import services
from searchrl.agent.fakes import KeywordRetriever
from searchrl.config import load_raw, validate
from searchrl.retrieval.http import (
    PROBE_QUERY,
    HTTPRetriever,
    ServiceRequestError,
    base_url,
    foreign_hash,
    parse_search_r1,
)
from searchrl.retrieval.retry import RetrievalError
from searchrl.retrieval.serve import ServerSettings, ServerState, create_app
from tests.conftest import PROJECT_ROOT

PASSAGES = [("p1", "Talo Vesk", "Talo Vesk is a chemist who was born in Peru."),
            ("p2", "Mira Sol", "Mira Sol works for Bantex Labs."),
            ("p3", "France", "France is a country in Europe. Its capital city is Paris."),
            ("p4", "Bantex Labs", "Bantex Labs was founded in 1987.")]


@contextlib.contextmanager
def live(retriever=None, **settings):
    """A real uvicorn server in a thread on a free loopback port; yields (url, state)."""
    state = ServerState(ServerSettings(**settings))
    if retriever is not None:
        state.ready(retriever, manifest={"kind": "keyword"})
    port = services.free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(10)
        state.close()


class Renamed(KeywordRetriever):
    manifest_hash = "another-index"


def test_searchrl_api_returns_the_in_process_hits_and_hash():
    with live(KeywordRetriever(PASSAGES)) as (url, _):
        r = HTTPRetriever(url + "/")
        queries = ["where was Talo Vesk born", "Bantex Labs founded"]
        assert r.search(queries, 3) == KeywordRetriever(PASSAGES).search(queries, 3)
        assert r.manifest_hash == "keyword-retriever" and r.url == url
        assert r.search([], 3) == []


def test_search_r1_api_reads_their_shape_and_derives_an_identity():
    with live(KeywordRetriever(PASSAGES)) as (url, _):
        r = HTTPRetriever(url + "/retrieve", api="search_r1")
        assert r.url == url
        got = r.search(["capital of France", "Mira Sol"], 2)
        assert got == KeywordRetriever(PASSAGES).search(["capital of France", "Mira Sol"], 2)
        probe = KeywordRetriever(PASSAGES).search([PROBE_QUERY], 3)[0]
        assert r.manifest_hash == foreign_hash(url, "search_r1", probe)
        assert HTTPRetriever(url, api="search_r1").manifest_hash == r.manifest_hash  # stable across clients
    other = PASSAGES[:3] + [("p9", "George Washington", "George Washington was the first president.")]
    with live(KeywordRetriever(other)) as (url2, _):
        # another corpus behind the same kind of server: another identity, so the cache never mixes them
        assert HTTPRetriever(url2, api="search_r1").manifest_hash != foreign_hash(url2, "search_r1", probe)


def test_search_r1_documents_without_title_fields_are_split_from_contents():
    body = {"result": [[{"document": {"id": "7", "contents": '"Aaron"\nAaron is a prophet.\nMore.'}, "score": 1.5}],
                       [{"id": "8", "contents": "NoQuotes\ntext"}]]}
    rows = parse_search_r1(body, 2, 3)
    assert [(h.id, h.title, h.text, h.score) for h in rows[0]] == [("7", "Aaron", "Aaron is a prophet.\nMore.", 1.5)]
    assert [(h.id, h.title, h.text, h.score) for h in rows[1]] == [("8", "NoQuotes", "text", 0.0)]
    for bad, why in (({"results": []}, "expected {'result'"), ({"result": [[]]}, "1 result rows for 2 queries"),
                     ({"result": [[{"document": {"id": 1}}], []]}, "no 'contents'")):
        with pytest.raises(ValueError, match=why):
            parse_search_r1(bad, 2, 3)


def test_5xx_are_retried_and_counted():
    with live(KeywordRetriever(PASSAGES), fail_rate=0.5, fail_seed=0) as (url, state):  # <= 3 in a row
        r = HTTPRetriever(url).with_retries(retries=12, backoff_s=0.0)
        for i in range(20):
            assert len(r.search([f"Talo Vesk {i}"], 2)[0]) == 2
        assert state.injected_faults > 0 and r.retries == state.injected_faults and r.failures == 0


def test_a_server_that_is_down_is_one_error_naming_the_url_after_the_budget():
    url = f"http://127.0.0.1:{services.free_port()}"
    sleeps: list[float] = []
    r = HTTPRetriever(url).with_retries(retries=3, backoff_s=0.2)
    r._sleep = sleeps.append  # noqa: SLF001 - no real waiting in a unit test
    with pytest.raises(RetrievalError) as err:
        r.search(["where was Talo Vesk born"], 3)
    msg = str(err.value)
    assert msg == (f"retrieval failed 4 times on retrieval service {url}: query 'where was Talo Vesk born': "
                   f"ServiceUnavailable: POST {url}/search: connection refused")
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2] and r.retries == 3 and r.failures == 1


def test_a_rejected_request_is_not_retried_and_carries_the_servers_reason():
    with live(KeywordRetriever(PASSAGES), max_k=5) as (url, _):
        r = HTTPRetriever(url).with_retries(retries=5, backoff_s=0.0)
        with pytest.raises(ServiceRequestError, match=rf"POST {url}/search: HTTP 422 k: 6 is above this server's "
                                                      r"limit of 5"):
            r.search(["x"], 6)
        assert r.retries == 0
        wrong = HTTPRetriever(url + "/retrieve")  # a searchrl client pointed at /retrieve
        with pytest.raises(ServiceRequestError, match=r"HTTP 404 .*is retrieval.api right"):
            wrong.search(["x"], 1)


def test_a_manifest_that_changes_mid_run_is_refused():
    with live(KeywordRetriever(PASSAGES)) as (url, state):
        r = HTTPRetriever(url)
        assert r.manifest_hash == "keyword-retriever"
        state.retriever = Renamed(PASSAGES)  # the server now answers for another index
        state.coalescer.search = state.retriever.search
        with pytest.raises(ServiceRequestError, match=r"now serves index another-index, this run started on "
                                                      r"keyword-retriever"):
            r.search(["x"], 1)


def test_large_batches_are_split_into_requests():
    with live(KeywordRetriever(PASSAGES)) as (url, state):
        r = HTTPRetriever(url, max_queries=3)
        queries = [f"Mira Sol {i}" for i in range(8)]
        assert r.search(queries, 1) == KeywordRetriever(PASSAGES).search(queries, 1)
        assert state.coalescer.stats.requests == 3


def test_base_url_forms():
    assert base_url("http://h:8000/retrieve", "search_r1") == "http://h:8000"
    assert base_url("http://h:8000/api/retrieve/", "search_r1") == "http://h:8000/api"
    assert base_url("https://h/x/", "searchrl") == "https://h/x"
    with pytest.raises(ValueError, match="not an http"):
        base_url("h:8000", "searchrl")


# ----------------------------------------------------------------------------- factory wiring
def params_for(tmp_path, url: str, **retrieval):
    raw = load_raw(PROJECT_ROOT / "params.yaml")
    raw["agent"].update(cache_path=str(tmp_path / "cache.sqlite"), retrieval_retries=4, retrieval_backoff_s=0.0)
    raw["index"]["out_dir"] = str(tmp_path / "no-index")
    raw["retrieval"] = {"url": url, **retrieval}
    return validate(raw)


def test_retrieval_url_puts_the_client_behind_the_cache_and_the_retries(tmp_path):
    from searchrl.retrieval.cache import CachedRetriever
    from searchrl.retrieval.factory import open_retriever

    with live(KeywordRetriever(PASSAGES)) as (url, state):
        r = open_retriever(params_for(tmp_path, url))
        assert isinstance(r.inner, CachedRetriever) and isinstance(r.inner.retriever, HTTPRetriever)
        assert r.manifest_hash == "keyword-retriever" and r.kind == "retrieval service" and r.name == url
        first = r.search(["where was Talo Vesk born", "Mira Sol"], 3)
        served = state.coalescer.stats.queries
        again = r.search(["Mira Sol", "where was Talo Vesk born"], 3)
        assert again == first[::-1] and state.coalescer.stats.queries == served == 2  # cache hits stay local
        # the same rows in the cache under the index's own hash: an in-process run reuses them
        cached = CachedRetriever(KeywordRetriever(PASSAGES), tmp_path / "cache.sqlite")
        assert cached.lookup(["Mira Sol"], 3)["Mira Sol"] == first[1]


def test_a_server_still_loading_is_waited_for_at_start(tmp_path):
    from searchrl.retrieval.factory import open_retriever

    with live(None) as (url, state):  # listening, index not loaded yet: /manifest answers 503
        threading.Timer(0.3, state.ready, args=(KeywordRetriever(PASSAGES),)).start()
        params = params_for(tmp_path, url)
        params.agent.retrieval_backoff_s = 0.1
        r = open_retriever(params)
        assert r.manifest_hash == "keyword-retriever" and r.retries >= 1
        assert requests.get(url + "/health", timeout=5).status_code == 200


def test_a_down_service_fails_the_stage_start_in_one_line(tmp_path):
    from searchrl.retrieval.factory import open_retriever

    url = f"http://127.0.0.1:{services.free_port()}"
    params = params_for(tmp_path, url)
    params.agent.retrieval_retries = 1
    with pytest.raises(RetrievalError) as err:
        open_retriever(params)
    assert str(err.value) == (f"retrieval failed 2 times on retrieval service {url}: GET /manifest: "
                              f"ServiceUnavailable: GET {url}/manifest: connection refused")


def test_managed_server_becomes_the_url_and_bad_urls_are_refused(tmp_path):
    raw = load_raw(PROJECT_ROOT / "params.yaml")
    raw["retrieval"] = {"serve": {"managed": True, "port": 9123}}
    assert validate(raw).retrieval.url == "http://127.0.0.1:9123"
    raw["retrieval"] = {"url": "http://10.0.0.1:9", "serve": {"managed": True}}
    with pytest.raises(Exception, match=r"retrieval.url \(http://10.0.0.1:9\) is not the managed server's"):
        validate(raw)
    raw["retrieval"] = {"url": "localhost:8000"}
    with pytest.raises(Exception, match="retrieval.url: 'localhost:8000' is not an http"):
        validate(raw)
    raw["retrieval"] = {"url": "http://h:1", "api": "flashrag"}
    with pytest.raises(Exception, match="retrieval.api"):
        validate(raw)
