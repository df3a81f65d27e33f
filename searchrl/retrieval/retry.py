"""Bounded retries for retrieval calls, so one failed search does not lose a batch of rollouts.

`RetryingRetriever` wraps any Retriever (an index, the SQLite cache in front of it, an HTTP client):
a `search` call that raises is repeated up to `retries` more times, sleeping
`backoff_s * 2**attempt * U(0.5, 1.5)` between tries (exponential backoff with jitter, so workers that
failed together do not retry together). Every retry is counted (`.retries`, `.failures`) and logged.
After the budget it raises `RetrievalError`, one line naming the index (or the retrieval service's
URL: `kind`, `name`) and the first query of the batch; `call(fn, what)` applies the same policy to
any other call (the HTTP client's GET /manifest). A `SearchRLError` (a corrupted index, a bad
configuration, a request the server rejects as malformed) is the user's to fix and is not retried.
The stage that called it stops there, and what it saved before (RL checkpoints, the cache) stays, so
a rerun resumes.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from searchrl.errors import SearchRLError
from searchrl.retrieval.base import Hit, Retriever

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetrievalError(SearchRLError):
    """Retrieval kept failing after its retry budget."""


class RetryingRetriever:
    """Retriever interface (search, manifest_hash) with bounded, logged retries around another one."""

    def __init__(self, inner: Retriever, retries: int = 3, backoff_s: float = 0.5, name: str = "",
                 sleep=time.sleep, seed: int | None = None, kind: str = "index"):
        if retries < 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")
        self.inner, self.max_retries, self.backoff_s = inner, retries, backoff_s
        self.name = name or getattr(inner, "path", None) or type(inner).__name__
        self.kind = kind  # what `name` is, for the error line: "index", "retrieval service"
        self.retries = 0  # retried calls so far
        self.failures = 0  # calls that failed for good
        self._sleep = sleep
        self._rng = random.Random(seed)

    @property
    def manifest_hash(self) -> str:
        return self.inner.manifest_hash

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        first = queries[0] if queries else ""
        more = f" (+{len(queries) - 1} more in the batch)" if len(queries) > 1 else ""
        return self.call(lambda: self.inner.search(queries, k), f"query {first[:120]!r}{more}")

    def call(self, fn: Callable[[], T], what: str) -> T:
        """`fn()` under this retry policy (counted in `.retries` / `.failures`); `what` names the call
        in the error line, e.g. "query 'x'" or "GET /manifest"."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except SearchRLError:
                raise
            except Exception as err:  # noqa: BLE001 - any transport / backend failure is retried
                if attempt == self.max_retries:
                    self.failures += 1
                    raise RetrievalError(
                        f"retrieval failed {attempt + 1} times on {self.kind} {self.name}: {what}: "
                        f"{type(err).__name__}: {err}".replace("\n", " ")) from err
                self.retries += 1
                wait = self.backoff_s * (2 ** attempt) * self._rng.uniform(0.5, 1.5)
                log.warning("retrieval on %s failed (%s: %s); retry %d of %d in %.2fs", self.name,
                            type(err).__name__, str(err)[:200], attempt + 1, self.max_retries, wait)
                self._sleep(wait)
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        return f"RetryingRetriever({self.inner!r}, retries={self.retries}, failures={self.failures})"
