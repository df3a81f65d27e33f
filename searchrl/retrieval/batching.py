"""Request coalescing for the retrieval server: many concurrent callers, one searching thread.

A rollout worker sends a few queries at a time; a server that ran one index search per request would
pay the encoder's and faiss's per-call cost once per request, and requests that arrive together
would queue behind each other (the blocking retrieval servers peers' users complain about). Here
every request goes into one queue, and a single worker thread drains it:

    wait for the first request; then keep collecting until the batch holds `max_batch` queries or
    `max_wait_s` has passed since that first request arrived; run one `search(queries, k)` per
    distinct k over the whole batch (duplicates searched once); hand each request its own rows.

While the worker searches, new requests pile up and form the next batch at once, so under load the
batch size follows the arrival rate without any waiting, and the wait only applies to a lone request
on an idle server (where it costs at most `max_wait_s`). A request larger than `max_batch` is
searched whole, alone. One thread owns the retriever, so the encoder and faiss run in one place with
the thread counts the server set (no oversubscription from many handler threads), and a retriever
that is not thread-safe is never called concurrently.

Results are those of `search(batch, k)`: per query, exactly what the retriever returns for that query
and k (rows of a faiss / BM25 batch search are independent). Requests with different k are never
mixed in one call: a larger k can change an approximate index's top results (HNSW's ef = max(efSearch,
k)), and the retrieval cache is keyed by k.

`submit` raises `Overloaded` when more than `max_pending` queries wait (the server answers 503, which
clients retry with backoff); a search that raises fails every request of its batch with that error,
and the worker carries on.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from searchrl.retrieval.base import Hit

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """More queries are waiting than the coalescer accepts."""


@dataclass
class _Request:
    queries: list[str]
    k: int
    future: Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters since start: requests and queries served, index searches run (one per distinct k per
    batch), batches, the largest batch, and seconds spent inside `search`."""

    requests: int = 0
    queries: int = 0
    unique_queries: int = 0
    searches: int = 0
    batches: int = 0
    max_batch_queries: int = 0
    search_seconds: float = 0.0
    failed_batches: int = 0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["search_seconds"] = round(self.search_seconds, 4)
        d["mean_batch_queries"] = round(self.queries / self.batches, 2) if self.batches else 0.0
        return d


class Coalescer:
    """Queue + one worker thread around `search(queries, k) -> list[list[Hit]]` (see the module
    docstring). `submit(queries, k)` returns a Future of the request's rows; `close()` stops the
    worker and fails what is still queued."""

    def __init__(self, search: Callable[[list[str], int], list[list[Hit]]], max_batch: int = 64,
                 max_wait_s: float = 0.002, max_pending: int = 16384, name: str = "retrieval-batcher"):
        if max_batch < 1 or max_wait_s < 0 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1, max_wait_s >= 0")
        self.search, self.max_batch, self.max_wait_s, self.max_pending = search, max_batch, max_wait_s, max_pending
        self.stats = BatchStats()
        self._queue: collections.deque[_Request] = collections.deque()
        self._pending = 0  # queries in the queue
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, queries: list[str], k: int) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the coalescer is closed")
            if self._pending and self._pending + len(queries) > self.max_pending:
                raise Overloaded(f"{self._pending} queries are waiting (limit {self.max_pending})")
            self._queue.append(_Request(list(queries), k, fut))
            self._pending += len(queries)
            self._cv.notify()
        return fut

    def pending(self) -> int:
        with self._cv:
            return self._pending

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout_s)
        with self._cv:
            while self._queue:
                req = self._queue.popleft()
                if not req.future.done():
                    req.future.set_exception(RuntimeError("the retrieval server is shutting down"))

    # ------------------------------------------------------------------ worker
    def _take(self) -> list[_Request] | None:
        """The next batch: block for a first request, then collect until max_batch queries or
        max_wait_s after the first one arrived. None once closed."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            deadline = self._queue[0].arrived + self.max_wait_s
            while self._pending < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, n = [], 0
            while self._queue and (not batch or n + len(self._queue[0].queries) <= self.max_batch):
                req = self._queue.popleft()
                batch.append(req)
                n += len(req.queries)
            self._pending -= n
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self._serve(batch)

    def _serve(self, batch: list[_Request]) -> None:
        by_k: dict[int, list[_Request]] = collections.defaultdict(list)
        for req in batch:
            by_k[req.k].append(req)
        st = self.stats
        st.batches += 1
        st.requests += len(batch)
        n = sum(len(r.queries) for r in batch)
        st.queries += n
        st.max_batch_queries = max(st.max_batch_queries, n)
        for k, reqs in by_k.items():
            uniq = list(dict.fromkeys(q for r in reqs for q in r.queries))
            t0 = time.perf_counter()
            try:
                rows = self.search(uniq, k)
                if len(rows) != len(uniq):
                    raise RuntimeError(f"the retriever returned {len(rows)} rows for {len(uniq)} queries")
            except BaseException as err:  # noqa: BLE001 - every request of the batch gets the error
                st.failed_batches += 1
                log.warning("search of %d queries (k=%d) failed: %s: %s", len(uniq), k, type(err).__name__, err)
                for r in reqs:
                    if not r.future.done():
                        r.future.set_exception(err)
                continue
            finally:
                st.search_seconds += time.perf_counter() - t0
                st.searches += 1
            st.unique_queries += len(uniq)
            found = dict(zip(uniq, rows, strict=True))
            for r in reqs:
                if not r.future.done():
                    r.future.set_result([found[q] for q in r.queries])
