"""HTTPRetriever: the Retriever protocol over HTTP, against our retrieval service or a Search-R1 one.

    r = HTTPRetriever("http://127.0.0.1:8765")                        # python -m searchrl.retrieval.serve
    r = HTTPRetriever("http://10.0.0.5:8000/retrieve", api="search_r1")  # Search-R1's retrieval_server.py
    r.search(["who wrote hamlet"], 3)   -> [[Hit(id, title, text, score), ...]]

APIs:
- `searchrl`: POST /search {queries, k}; the manifest hash is the served index's own (GET /manifest),
  identical to the in-process retriever's, so the retrieval cache (searchrl/retrieval/cache.py) serves
  the same rows whether the index is in process or behind the URL. Every answer carries the hash
  again; if it changes mid-run (the server was restarted on another index) the call fails with an
  error instead of mixing two indexes' results under one cache key.
- `search_r1`: POST /retrieve {queries, topk, return_scores: true}, Search-R1's shape (also verl's
  search tool and FlashRAG-backed servers). Documents are `{"id", "contents": '"title"\\ntext'}`
  (wiki-18); an explicit `title` / `text` is used when the server sends one. A foreign server
  publishes no manifest, so the hash that keys the cache is derived instead:
  `stable_hash({url, api, probe answer})`, where the probe answer is the ids and contents of the top 3
  documents for a fixed probe query (scores left out: GPU faiss does not reproduce them bit for bit).
  The cache therefore separates two servers, and a server whose corpus or index changed behind the
  same URL as soon as that changes the probe's top 3; a change the probe cannot see (same top 3 for
  the probe, other results elsewhere) goes unnoticed, so give a changed server a new URL (a port).

Transport: a pooled `requests.Session` per process (pool_size connections, reused across calls and
threads), connect and read timeouts, large batches split into requests of at most max_queries.
Failures are classified for the retry layer (`searchrl/retrieval/retry.py`, which the factory wraps
around the cache in front of this client, and which counts `.retries` for the RL metrics):
- `ServiceUnavailable` (retried): connection refused / reset, timeouts, 5xx, 408, 429;
- `ServiceRequestError`, a SearchRLError (not retried): any other 4xx (the server's reason is in the
  message), an answer that is not the API's shape, or a changed manifest hash.
Use `HTTPRetriever(...).with_retries(retries, backoff_s)` for a standalone client with the same
retry policy. Every message names the URL.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from urllib.parse import urlsplit

from searchrl.errors import SearchRLError
from searchrl.io import stable_hash
from searchrl.retrieval.base import Hit

log = logging.getLogger(__name__)

APIS = ("searchrl", "search_r1")
PROBE_QUERY = "who was the first president of the united states"
PROBE_K = 3


class ServiceUnavailable(RuntimeError):
    """A transient failure of the retrieval service (retried)."""


class ServiceRequestError(SearchRLError):
    """The retrieval service refused the request or answered in an unexpected shape (not retried)."""


def base_url(url: str, api: str) -> str:
    """The service root: trailing slashes and a Search-R1 `/retrieve` suffix dropped. ValueError for a
    URL that is not http(s)://host[:port][/path]."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"retrieval.url: '{url}' is not an http(s) URL such as http://127.0.0.1:8765")
    path = parts.path.rstrip("/")
    if api == "search_r1" and path.endswith("/retrieve"):
        path = path[: -len("/retrieve")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def parse_search_r1_document(doc) -> tuple[str, str, str]:
    """(id, title, text) of a Search-R1 document: explicit title/text if present, else split from
    `contents` as Search-R1's client does (first line = title, quotes stripped; rest = text)."""
    if not isinstance(doc, dict):
        raise ValueError(f"a document is a {type(doc).__name__}, not an object")
    pid = str(doc.get("id", doc.get("doc_id", "")))
    if "title" in doc and "text" in doc:
        return pid, str(doc["title"]), str(doc["text"])
    contents = doc.get("contents")
    if not isinstance(contents, str):
        raise ValueError(f"a document has no 'contents' string (keys: {sorted(doc)[:6]})")
    title, _, text = contents.partition("\n")
    return pid, title.strip().strip('"'), text


def parse_search_r1(body, n: int, k: int) -> list[list[Hit]]:
    """Search-R1's /retrieve answer -> n lists of Hits. ValueError when the shape is not theirs."""
    if not isinstance(body, dict) or not isinstance(body.get("result"), list):
        keys = sorted(body)[:6] if isinstance(body, dict) else type(body).__name__
        raise ValueError(f"expected {{'result': [...]}}, got {keys}")
    rows = body["result"]
    if len(rows) != n:
        raise ValueError(f"{len(rows)} result rows for {n} queries")
    out = []
    for row in rows:
        if not isinstance(row, list):
            raise ValueError(f"a result row is a {type(row).__name__}, not a list")
        hits = []
        for item in row[:k]:
            if isinstance(item, dict) and "document" in item:
                doc, score = item["document"], item.get("score", 0.0)
            else:  # return_scores false: the document itself
                doc, score = item, 0.0
            pid, title, text = parse_search_r1_document(doc)
            hits.append(Hit(pid, title, text, float(score if score is not None else 0.0)))
        out.append(hits)
    return out


def parse_searchrl(body, n: int) -> tuple[str, list[list[Hit]]]:
    """Our /search answer -> (manifest_hash, n lists of Hits). ValueError when the shape is not ours."""
    if not isinstance(body, dict) or not isinstance(body.get("hits"), list) or "manifest_hash" not in body:
        keys = sorted(body)[:6] if isinstance(body, dict) else type(body).__name__
        raise ValueError(f"expected {{'manifest_hash', 'hits'}}, got {keys}")
    if len(body["hits"]) != n:
        raise ValueError(f"{len(body['hits'])} hit lists for {n} queries")
    return body["manifest_hash"], [[Hit(str(h["id"]), h["title"], h["text"], float(h["score"])) for h in row]
                                   for row in body["hits"]]


def _reason(err: Exception) -> str:
    """A short reason for a requests exception (its repr nests urllib3's whole story)."""
    import requests

    text = str(err)
    if isinstance(err, requests.ConnectTimeout):
        return "connect timed out"
    if isinstance(err, requests.ReadTimeout):
        return "read timed out"
    if isinstance(err, requests.ConnectionError):
        for key, short in (("Connection refused", "connection refused"), ("reset by peer", "connection reset"),
                           ("RemoteDisconnected", "server closed the connection"),
                           ("Name or service not known", "unknown host"), ("No route to host", "no route to host")):
            if key in text:
                return short
        return "connection failed"
    return f"{type(err).__name__}: {text[:200]}"


class HTTPRetriever:
    """Retriever protocol (search, manifest_hash) over HTTP; see the module docstring."""

    def __init__(self, url: str, api: str = "searchrl", timeout_s: float = 60.0, connect_timeout_s: float = 5.0,
                 pool_size: int = 32, max_queries: int = 1024, session=None):
        if api not in APIS:
            raise ValueError(f"retrieval.api: '{api}' is not one of {', '.join(APIS)}")
        self.api, self.url = api, base_url(url, api)
        self.timeout = (connect_timeout_s, timeout_s)
        self.pool_size, self.max_queries = pool_size, max_queries
        self._given_session = session
        self._sessions: dict[int, object] = {}
        self._hash: str | None = None
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests sent (searches + probes)

    # ------------------------------------------------------------------ transport
    def _session(self):
        if self._given_session is not None:
            return self._given_session
        pid = os.getpid()
        with self._lock:  # one pooled session per process: never share sockets across fork
            sess = self._sessions.get(pid)
            if sess is None:
                import requests
                from requests.adapters import HTTPAdapter

                sess = requests.Session()
                adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_size, max_retries=0)
                sess.mount("http://", adapter)
                sess.mount("https://", adapter)
                self._sessions = {pid: sess}
        return sess

    def _request(self, method: str, path: str, payload: dict | None = None):
        import requests

        where = f"{method} {self.url}{path}"
        self.requests += 1
        try:
            resp = self._session().request(method, self.url + path, json=payload, timeout=self.timeout)
        except requests.RequestException as err:
            raise ServiceUnavailable(f"{where}: {_reason(err)}") from None
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            raise ServiceUnavailable(f"{where}: HTTP {resp.status_code} {_detail(resp)}")
        if resp.status_code >= 400:
            hint = " (is retrieval.api right? a Search-R1 server answers only POST /retrieve)" \
                if resp.status_code in (404, 405) else ""
            raise ServiceRequestError(f"{where}: HTTP {resp.status_code} {_detail(resp)}{hint}")
        try:
            return resp.json()
        except ValueError:
            raise ServiceRequestError(f"{where}: the answer is not JSON ({resp.text[:120]!r})") from None

    # ------------------------------------------------------------------ identity
    @property
    def manifest_hash(self) -> str:
        """The served index's manifest hash (searchrl), or the derived identity of a foreign server
        (search_r1: see the module docstring). Fetched once, on first use."""
        if self._hash is None:
            self._hash = self.fetch_manifest_hash()
        return self._hash

    def identify(self, call=None) -> str:
        """Fetch the manifest hash now, through `call(fn, what)` (e.g. RetryingRetriever.call, so a
        server that is still starting is waited for), and keep it for the rest of the run."""
        what = "GET /manifest" if self.api == "searchrl" else "probe query"
        self._hash = call(self.fetch_manifest_hash, what) if call else self.fetch_manifest_hash()
        return self._hash

    def fetch_manifest_hash(self) -> str:
        if self.api == "searchrl":
            body = self._request("GET", "/manifest")
            if not isinstance(body, dict) or not isinstance(body.get("manifest_hash"), str):
                raise ServiceRequestError(f"GET {self.url}/manifest: no manifest_hash in the answer (is this a "
                                          "searchrl retrieval service? for a Search-R1 server set retrieval.api: "
                                          "search_r1)")
            return body["manifest_hash"]
        [probe] = self._search_r1([PROBE_QUERY], PROBE_K)
        return foreign_hash(self.url, self.api, probe)

    # ------------------------------------------------------------------ search
    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """k hits per query, best first, in max_queries-sized requests."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = list(queries)
        out: list[list[Hit]] = []
        for a in range(0, len(queries), self.max_queries):
            part = queries[a:a + self.max_queries]
            out.extend(self._search_r1(part, k) if self.api == "search_r1" else self._search(part, k))
        return out

    def _search(self, queries: list[str], k: int) -> list[list[Hit]]:
        body = self._request("POST", "/search", {"queries": queries, "k": k})
        try:
            served, rows = parse_searchrl(body, len(queries))
        except (ValueError, KeyError, TypeError) as err:
            raise ServiceRequestError(f"POST {self.url}/search: unexpected answer: {err}") from None
        if self._hash is None:
            self._hash = served
        elif served != self._hash:
            raise ServiceRequestError(
                f"{self.url} now serves index {served}, this run started on {self._hash} (the server was "
                "restarted on another index?); results of two indexes must not share a cache key: restart the "
                "stage")
        return rows

    def _search_r1(self, queries: list[str], k: int) -> list[list[Hit]]:
        body = self._request("POST", "/retrieve", {"queries": queries, "topk": k, "return_scores": True})
        try:
            return parse_search_r1(body, len(queries), k)
        except (ValueError, TypeError) as err:
            raise ServiceRequestError(f"POST {self.url}/retrieve: not Search-R1's answer shape: {err}") from None

    # ------------------------------------------------------------------ helpers
    def health(self) -> bool:
        """Whether the service answers now: GET /health 200 (searchrl); a probe search (search_r1)."""
        try:
            if self.api == "searchrl":
                self._request("GET", "/health")
            else:
                self._search_r1([PROBE_QUERY], 1)
            return True
        except (ServiceUnavailable, ServiceRequestError):
            return False

    def with_retries(self, retries: int = 3, backoff_s: float = 0.5):
        """This client behind RetryingRetriever (bounded retries with backoff, `.retries` counted)."""
        from searchrl.retrieval.retry import RetryingRetriever

        return RetryingRetriever(self, retries, backoff_s, name=self.url, kind="retrieval service")

    def close(self) -> None:
        with self._lock:
            for sess in self._sessions.values():
                sess.close()
            self._sessions = {}

    def __repr__(self) -> str:
        return f"HTTPRetriever({self.url}, api={self.api})"


def foreign_hash(url: str, api: str, probe: list[Hit]) -> str:
    """Identity of a server without a manifest: (url, api, the probe query's top documents)."""
    return stable_hash({"url": url, "api": api, "probe_query": PROBE_QUERY,
                        "probe": [[h.id, h.title, h.text] for h in probe]})


def _detail(resp) -> str:
    try:
        body = resp.json()
    except ValueError:
        return repr(resp.text[:200])
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return json.dumps(detail, ensure_ascii=False)[:300] if not isinstance(detail, str) else detail[:300]
