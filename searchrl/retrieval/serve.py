"""The retrieval service: one index in memory, served over HTTP to every rollout worker.

    python -m searchrl.retrieval.serve --index data/index                     # http://127.0.0.1:8765
    python -m searchrl.retrieval.serve --index data/index --host 0.0.0.0 --port 8765 --threads 16

Endpoints (JSON; a bad request is a 4xx whose `detail` says what is wrong, never a crash):

    POST /search    {"queries": [str, ...], "k": 3}
                    -> {"manifest_hash": str, "k": int, "hits": [[{"id", "title", "text", "score"}, ...], ...]}
                    hits per query, best first: what `load_index(dir).search(queries, k)` returns in
                    process; `manifest_hash` is the index's (the retrieval cache key), so a client's
                    cache stays valid across the wire.
    POST /retrieve  Search-R1's retrieval_server.py shape (search_r1/search/retrieval_server.py), for
                    Search-R1, verl and other clients of that server:
                    {"queries": [str, ...], "topk": 3, "return_scores": true}
                    -> {"result": [[{"document": {"id", "contents", "title", "text"}, "score": float}, ...], ...]}
                    (return_scores false: each row is the list of documents). `contents` is
                    '"<title>"\\n<text>', wiki-18's layout, from which Search-R1's client splits the
                    title (first line) and the text. topk absent or null: --default-topk (3, as
                    Search-R1's server). One difference: Search-R1 treats topk 0 as "default", here it
                    is a 422 like any k outside 1..1000.
    GET  /health    200 {"status": "ok", ...} once the index is loaded; 503 {"status": "loading"} before.
    GET  /manifest  the index manifest, its manifest_hash and the server's settings.
    GET  /stats     requests, queries, index searches, batch sizes, queue depth, injected faults.

The server listens at once and loads the index in a background thread, so a supervisor sees
"loading" rather than a refused connection during a long load; /search and /retrieve answer 503
until then (clients retry). A load that fails (missing or corrupted index, unknown encoder) prints
one line and exits with code 2.

Throughput: every request goes through one `Coalescer` (searchrl/retrieval/batching.py): concurrent
requests are merged into one encoder call and one faiss search per batch (--max-batch queries, at
most --max-wait-ms of added latency on an idle server), all on one thread that owns the retriever.
That thread's parallelism is set here, deliberately: --threads (default: the CPUs this process may
use) for faiss's OpenMP pool and torch's intra-op pool, one inter-op thread, and OMP/MKL variables
set before either library loads; the event loop thread only parses and serialises JSON.

Limits: k (and topk) in 1..--max-k (1000), 1..--max-queries queries per request (4096), bodies up to
--max-body-bytes (4 MiB; larger is 413), UTF-8 JSON only (400 otherwise), no lone UTF-16
surrogates in a query (400). More than --max-pending queued queries: 503 (clients back off).

Fault injection for tests and benchmarks: --fail-rate 0.2 answers a seeded 20% of /search and
/retrieve requests with 500 before searching (--fail-seed).

Binds 127.0.0.1 by default: the server has no authentication; expose it on a cluster network with
--host 0.0.0.0 only behind one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from searchrl.errors import SearchRLError
from searchrl.retrieval.base import Hit, Retriever
from searchrl.retrieval.batching import Coalescer, Overloaded

log = logging.getLogger("searchrl.retrieval.serve")

DEFAULT_PORT = 8765
MAX_K = 1000
MAX_QUERIES = 4096
MAX_BODY_BYTES = 4 << 20


# ----------------------------------------------------------------------------- requests
class SearchRequest(BaseModel):
    """POST /search."""

    model_config = ConfigDict(extra="forbid")
    queries: list[str] = Field(min_length=1, max_length=MAX_QUERIES)
    k: int = Field(3, ge=1, le=MAX_K)


class RetrieveRequest(BaseModel):
    """POST /retrieve, Search-R1's QueryRequest (other fields are ignored, as there)."""

    model_config = ConfigDict(extra="ignore")
    queries: list[str] = Field(min_length=1, max_length=MAX_QUERIES)
    topk: int | None = Field(None, ge=1, le=MAX_K)
    return_scores: bool = False


class BadRequest(Exception):
    """A request we answer with a 4xx: status code and one-line reason."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def validation_detail(err: ValidationError) -> str:
    """pydantic's errors as one line: `k: Input should be less than or equal to 1000; ...`."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (+{len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    return "; ".join(parts) + more


def parse_body(body: bytes, model: type[BaseModel], max_k: int = MAX_K, max_queries: int = MAX_QUERIES):
    """Bytes -> validated request model, or BadRequest(400 / 422) naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(400, f"request body is not UTF-8 (byte {err.start}: {err.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRequest(400, f"request body is not JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(obj, dict):
        raise BadRequest(422, f"request body must be a JSON object, got {type(obj).__name__}")
    try:
        req = model.model_validate(obj)
    except ValidationError as err:
        raise BadRequest(422, validation_detail(err)) from None
    k = getattr(req, "k", None) or getattr(req, "topk", None)
    if k is not None and k > max_k:
        raise BadRequest(422, f"k: {k} is above this server's limit of {max_k} (--max-k)")
    if len(req.queries) > max_queries:
        raise BadRequest(422, f"queries: {len(req.queries)} queries, this server takes at most {max_queries} "
                              "per request (--max-queries); split the batch")
    for i, q in enumerate(req.queries):
        try:
            q.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(400, f"queries.{i}: contains a lone UTF-16 surrogate (not text)") from None
    return req


# ----------------------------------------------------------------------------- responses
def search_r1_document(hit: Hit) -> dict:
    """A hit as a row of Search-R1's corpus (wiki-18: id + contents = '"title"\\n text'), plus the
    title and text fields FlashRAG's BM25 path returns."""
    return {"id": hit.id, "contents": f'"{hit.title}"\n{hit.text}', "title": hit.title, "text": hit.text}


def search_r1_result(rows: list[list[Hit]], return_scores: bool) -> dict:
    """Search-R1's /retrieve response body for per-query hit lists."""
    if return_scores:
        return {"result": [[{"document": search_r1_document(h), "score": h.score} for h in row] for row in rows]}
    return {"result": [[search_r1_document(h) for h in row] for row in rows]}


def search_result(rows: list[list[Hit]], k: int, manifest_hash: str) -> dict:
    return {"manifest_hash": manifest_hash, "k": k,
            "hits": [[{"id": h.id, "title": h.title, "text": h.text, "score": h.score} for h in row]
                     for row in rows]}


# ----------------------------------------------------------------------------- state + app
@dataclass
class ServerSettings:
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_pending: int = 16384
    max_k: int = MAX_K
    max_queries: int = MAX_QUERIES
    max_body_bytes: int = MAX_BODY_BYTES
    default_topk: int = 3
    fail_rate: float = 0.0
    fail_seed: int = 0
    threads: int = 0


@dataclass
class ServerState:
    """What the app serves: the retriever once loaded (None while loading), its coalescer, counters."""

    settings: ServerSettings = field(default_factory=ServerSettings)
    retriever: Retriever | None = None
    manifest: dict | None = None
    coalescer: Coalescer | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    load_seconds: float | None = None
    injected_faults: int = 0
    rejected: int = 0
    _rng: random.Random = field(default_factory=random.Random)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self._rng = random.Random(self.settings.fail_seed)

    def ready(self, retriever: Retriever, manifest: dict | None = None) -> None:
        s = self.settings
        self.coalescer = Coalescer(retriever.search, max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000,
                                   max_pending=s.max_pending)
        self.manifest = manifest if manifest is not None else getattr(retriever, "manifest", None)
        self.retriever = retriever  # last: /health turns ok only when everything above is in place

    def inject_fault(self) -> bool:
        if self.settings.fail_rate <= 0:
            return False
        with self._lock:
            hit = self._rng.random() < self.settings.fail_rate
            self.injected_faults += hit
        return hit

    def close(self) -> None:
        if self.coalescer is not None:
            self.coalescer.close()


def create_app(state: ServerState):
    """The FastAPI app over `state` (see the module docstring for the endpoints)."""
    app = FastAPI(title="searchrl retrieval service", version="1",
                  description="One index served to every rollout worker (searchrl.retrieval.serve).")
    s = state.settings

    def reply(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8"), status_code=status,
                        media_type="application/json")

    def error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > s.max_body_bytes:
            raise BadRequest(413, f"request body of {int(length)} bytes is over this server's limit of "
                                  f"{s.max_body_bytes} (--max-body-bytes); split the batch")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > s.max_body_bytes:
                raise BadRequest(413, f"request body is over this server's limit of {s.max_body_bytes} bytes "
                                      "(--max-body-bytes); split the batch")
        return bytes(body)

    async def run_search(request: Request, model: type[BaseModel]):
        """Shared part of /search and /retrieve: (request model, k, rows) or an error response."""
        if state.retriever is None:
            return None, error(503, "the index is still loading", {"Retry-After": "5"})
        try:
            req = parse_body(await read_body(request), model, s.max_k, s.max_queries)
        except BadRequest as err:
            state.rejected += 1
            return None, error(err.status, err.detail)
        if state.inject_fault():
            return None, error(500, f"injected fault (--fail-rate {s.fail_rate})")
        k = getattr(req, "k", None) or getattr(req, "topk", None) or s.default_topk
        try:
            fut = state.coalescer.submit(req.queries, k)
        except Overloaded as err:
            return None, error(503, f"overloaded: {err}", {"Retry-After": "1"})
        try:
            rows = await asyncio.wrap_future(fut)
        except Exception as err:  # noqa: BLE001 - the search failed: the client may retry
            return None, error(500, f"search failed: {type(err).__name__}: {err}".replace("\n", " "))
        return (req, k, rows), None

    def body_schema(model: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True,
                                "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/search", openapi_extra=body_schema(SearchRequest))
    async def search(request: Request):
        out, err = await run_search(request, SearchRequest)
        if err is not None:
            return err
        _, k, rows = out
        return reply(search_result(rows, k, state.retriever.manifest_hash))

    @app.post("/retrieve", openapi_extra=body_schema(RetrieveRequest))
    async def retrieve(request: Request):
        out, err = await run_search(request, RetrieveRequest)
        if err is not None:
            return err
        req, _, rows = out
        return reply(search_r1_result(rows, req.return_scores))

    @app.get("/health")
    async def health():
        if state.retriever is None:
            return reply({"status": "loading", "error": state.error}, 503)
        return reply({"status": "ok", "manifest_hash": state.retriever.manifest_hash,
                      "passages": _size(state.retriever), "load_seconds": state.load_seconds})

    @app.get("/manifest")
    async def manifest():
        if state.retriever is None:
            return error(503, "the index is still loading", {"Retry-After": "5"})
        return reply({"manifest_hash": state.retriever.manifest_hash, "manifest": state.manifest,
                      "server": {k: v for k, v in s.__dict__.items() if k != "fail_seed"}})

    @app.get("/stats")
    async def stats():
        c = state.coalescer
        return reply({"ready": state.retriever is not None, "uptime_s": round(time.time() - state.started, 1),
                      "pending_queries": c.pending() if c else 0, "injected_faults": state.injected_faults,
                      "rejected_requests": state.rejected, **(c.stats.to_dict() if c else {})})

    return app


def _size(retriever) -> int | None:
    try:
        return len(retriever)
    except TypeError:
        return None


# ----------------------------------------------------------------------------- loading
def set_threads(threads: int) -> int:
    """Intra-op threads of faiss (OpenMP) and torch for the searching thread; returns the number set
    (0 = the CPUs this process may use). Call before the index loads."""
    n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import faiss

    faiss.omp_set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # already set (torch allows it once, before any inter-op work)
    except ImportError:
        pass
    return n


def open_index(index_dir: str, nprobe: int | None = None, ef_search: int | None = None, device: str = "auto",
               batch_size: int = 128, verify: str = "auto"):
    """load_index(index_dir) with the manifest's own settings, except the search-time ones given
    (nprobe / efSearch change the manifest hash, as in process) and the encoder's device / batch."""
    from searchrl.config import IndexCfg
    from searchrl.retrieval.index import load_index, read_manifest

    m = read_manifest(index_dir)
    if m["kind"] == "bm25":
        return load_index(index_dir, IndexCfg(kind="bm25"), verify=verify)
    cfg = IndexCfg(kind="dense", encoder=m["encoder"], query_instruction=m["query_instruction"],
                   passage_prefix=m["passage_prefix"], factory=m["factory"], normalize=m["normalize"],
                   max_length=m["max_length"], nprobe=nprobe or m["nprobe"], ef_search=ef_search or m["ef_search"],
                   device=device, batch_size=batch_size)
    return load_index(index_dir, cfg, verify=verify)


def serve(state: ServerState, host: str = "127.0.0.1", port: int = DEFAULT_PORT, loader=None,
          access_log: bool = False) -> int:
    """Run the server until SIGINT / SIGTERM; `loader()` (if given) runs in a background thread and
    returns the retriever (a SearchRLError from it ends the server with exit code 2). Returns the exit
    code."""
    import uvicorn

    app = create_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=access_log,
                            timeout_keep_alive=75, backlog=4096, lifespan="off")
    server = uvicorn.Server(config)

    def load() -> None:
        t0 = time.perf_counter()
        try:
            retriever = loader()
        except SearchRLError as err:
            state.error = str(err)
            print(f"serve: error: {err}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        except BaseException as err:  # a bug: keep the traceback, stop the server
            state.error = f"{type(err).__name__}: {err}"
            log.exception("serve: loading the index failed")
            server.should_exit = True
            return
        state.load_seconds = round(time.perf_counter() - t0, 2)
        state.ready(retriever)
        log.info("serve: %r ready after %.1fs (manifest %s) on http://%s:%d", retriever, state.load_seconds,
                 retriever.manifest_hash, host, port)

    if loader is not None:
        threading.Thread(target=load, name="index-loader", daemon=True).start()
    try:
        server.run()
    finally:
        state.close()
    if state.error:
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m searchrl.retrieval.serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--index", required=True, help="index directory (index.out_dir, e.g. data/index)")
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it on every interface (no auth!)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port")
    ap.add_argument("--threads", type=int, default=0, help="faiss + torch threads of the searching thread; 0 = all CPUs")
    ap.add_argument("--max-batch", type=int, default=64, help="queries per coalesced index search")
    ap.add_argument("--max-wait-ms", type=float, default=2.0, help="latency a lone request may wait for company")
    ap.add_argument("--max-pending", type=int, default=16384, help="queued queries before answering 503")
    ap.add_argument("--max-k", type=int, default=MAX_K, help="largest k a request may ask for")
    ap.add_argument("--max-queries", type=int, default=MAX_QUERIES, help="queries per request")
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    ap.add_argument("--default-topk", type=int, default=3, help="/retrieve's topk when a request leaves it out")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists visited (default: the manifest's)")
    ap.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: the manifest's)")
    ap.add_argument("--device", default="auto", help="query encoder device: auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=int, default=128, help="query encoder batch size")
    ap.add_argument("--verify", default="auto", choices=["auto", "full", "size"],
                    help="check index files: sha256 up to 1 GiB (auto), always (full), sizes only (size)")
    ap.add_argument("--fail-rate", type=float, default=0.0, help="answer this share of searches with 500 (tests)")
    ap.add_argument("--fail-seed", type=int, default=0)
    ap.add_argument("--access-log", action="store_true")
    args = ap.parse_args(argv)
    if not 0 <= args.fail_rate <= 1:
        ap.error("--fail-rate must be in [0, 1]")
    if args.max_k < 1 or args.max_k > MAX_K or args.max_batch < 1:
        ap.error(f"--max-k must be in 1..{MAX_K}, --max-batch >= 1")
    from searchrl.stage import setup_logging

    setup_logging()
    threads = set_threads(args.threads)
    settings = ServerSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_pending=args.max_pending,
                              max_k=args.max_k, max_queries=args.max_queries, max_body_bytes=args.max_body_bytes,
                              default_topk=args.default_topk, fail_rate=args.fail_rate, fail_seed=args.fail_seed,
                              threads=threads)
    verify = {"auto": "auto", "full": "full", "size": False}[args.verify]
    log.info("serve: loading %s (%d threads) on http://%s:%d", args.index, threads, args.host, args.port)
    return serve(ServerState(settings), args.host, args.port, access_log=args.access_log,
                 loader=lambda: open_index(args.index, args.nprobe, args.ef_search, args.device, args.batch_size,
                                           verify))


def serve_command(params, index_dir: str, python: str | None = None) -> list[str]:
    """The command the flow runs for `retrieval.serve.managed` (params: the run's Params)."""
    srv = params.retrieval.serve
    return [python or sys.executable, "-m", "searchrl.retrieval.serve", "--index", str(index_dir),
            "--host", srv.host, "--port", str(srv.port), "--threads", str(srv.threads),
            "--max-batch", str(srv.max_batch), "--max-wait-ms", str(srv.max_wait_ms),
            "--device", params.index.device, *srv.extra_args]


if __name__ == "__main__":
    sys.exit(main())
