"""A persistent retrieval cache: SQLite rows keyed by (manifest hash, k, query).

`CachedRetriever` wraps any Retriever and keeps its interface. A batch looks up every query, sends
only the misses to the wrapped retriever in one `search` call, stores their hits and returns all
results in the input order. Because the key includes the index's manifest hash (corpus, encoder,
index and search settings), a rebuilt or re-configured index never serves stale hits, while repeated
evaluations and rollouts over the same index replay exactly, offline and without loading the
encoder: `CachedRetriever.for_index(dir, path)` only opens the index on the first miss.

Concurrency: one SQLite connection per thread and process, WAL journal, a 60 s busy timeout and
`INSERT OR IGNORE` (the first stored answer wins), so several readers and one writer at a time
(threads, DataLoader workers, a second stage) are safe.

The cache is disposable: a file that is not an SQLite database (or one SQLite reports as malformed)
is moved aside as `NAME.damaged-<time>` with a warning naming it (`searchrl.io.quarantine`), and an
empty cache takes its place; the searches it held are simply redone.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from searchrl.io import open_sqlite, quarantine
from searchrl.retrieval.base import Hit, Retriever

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS hits (
    manifest_hash TEXT NOT NULL,
    k INTEGER NOT NULL,
    query TEXT NOT NULL,
    hits TEXT NOT NULL,          -- JSON: [[id, title, text, score], ...] best first
    created REAL NOT NULL,
    PRIMARY KEY (manifest_hash, k, query)
) WITHOUT ROWID
"""
_CHUNK = 500  # queries per SELECT ... IN (...) (well below SQLite's variable limit)


def _encode_hits(hits: list[Hit]) -> str:
    return json.dumps([[h.id, h.title, h.text, h.score] for h in hits], ensure_ascii=False)


def _decode_hits(text: str) -> list[Hit]:
    return [Hit(id=i, title=t, text=x, score=s) for i, t, x, s in json.loads(text)]


class CachedRetriever:
    """Retriever interface (search, manifest_hash) over an SQLite cache of another retriever."""

    def __init__(self, retriever: Retriever | None, path: str | os.PathLike, *,
                 manifest_hash: str | None = None, loader: Callable[[], Retriever] | None = None):
        if retriever is None and (loader is None or manifest_hash is None):
            raise ValueError("CachedRetriever needs a retriever, or a loader plus its manifest_hash")
        self._inner, self._loader = retriever, loader
        self.manifest_hash = manifest_hash or retriever.manifest_hash
        if retriever is not None and retriever.manifest_hash != self.manifest_hash:
            raise ValueError(f"manifest_hash {manifest_hash} does not match the retriever's "
                             f"{retriever.manifest_hash}")
        self.path = Path(path)
        self._local = threading.local()
        self._load_lock = threading.Lock()
        self.hits = self.misses = 0
        self._recovery_lock = threading.Lock()
        self._conn()  # create the schema now: a bad path fails here, not mid-evaluation

    @classmethod
    def for_index(cls, index_dir: str | os.PathLike, path: str | os.PathLike, cfg=None) -> CachedRetriever:
        """Cache over an index directory that is loaded (encoder included) only on the first miss."""
        from searchrl.retrieval.index import index_manifest_hash, load_index

        return cls(None, path, manifest_hash=index_manifest_hash(index_dir, cfg),
                   loader=lambda: load_index(index_dir, cfg))

    # ------------------------------------------------------------------ plumbing
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():  # never share a connection across fork
            try:
                conn = self._open()
            except sqlite3.DatabaseError as err:
                if not _damaged(err):
                    raise
                self._discard(err)
                conn = self._open()
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = open_sqlite(self.path, "agent.cache_path", timeout=60, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _discard(self, err: BaseException) -> None:
        """Move the damaged database aside, unless another thread or process already replaced it
        (checked under a file lock, so two processes never move each other's fresh cache)."""
        from filelock import FileLock

        with self._recovery_lock, FileLock(self.path.with_name(f".{self.path.name}.lock")):
            if getattr(self._local, "conn", None) is not None and self._local.pid == os.getpid():
                self._local.conn.close()
            self._local.conn = None
            try:
                probe = self._open()
                probe.execute("SELECT COUNT(*) FROM hits").fetchone()
                probe.close()
                return  # a fresh cache is already in place
            except sqlite3.DatabaseError as again:
                if not _damaged(again):
                    raise
            quarantine(self.path, str(err), sidecars=("-wal", "-shm"))

    def _guarded(self, fn: Callable[[sqlite3.Connection], object]):
        """Run `fn(connection)`; a database found damaged mid-run is replaced by an empty one and `fn`
        runs once more on it."""
        try:
            return fn(self._conn())
        except sqlite3.DatabaseError as err:
            if not _damaged(err):
                raise
            self._discard(err)
            return fn(self._conn())

    @property
    def retriever(self) -> Retriever:
        if self._inner is None:
            with self._load_lock:
                if self._inner is None:
                    inner = self._loader()
                    if inner.manifest_hash != self.manifest_hash:
                        raise ValueError(f"the loaded index has manifest_hash {inner.manifest_hash}, the cache "
                                         f"was opened for {self.manifest_hash}")
                    self._inner = inner
        return self._inner

    @property
    def manifest(self) -> dict | None:
        return getattr(self._inner, "manifest", None)

    def lookup(self, queries: list[str], k: int) -> dict[str, list[Hit]]:
        """Cached hits for the queries that have them."""
        uniq = list(dict.fromkeys(queries))

        def select(conn: sqlite3.Connection) -> dict[str, list[Hit]]:
            found: dict[str, list[Hit]] = {}
            for a in range(0, len(uniq), _CHUNK):
                part = uniq[a:a + _CHUNK]
                rows = conn.execute(
                    f"SELECT query, hits FROM hits WHERE manifest_hash = ? AND k = ? AND query IN "
                    f"({','.join('?' * len(part))})", [self.manifest_hash, k, *part]).fetchall()
                found.update((q, _decode_hits(h)) for q, h in rows)
            return found

        return self._guarded(select)

    def store(self, results: dict[str, list[Hit]], k: int) -> None:
        now = time.time()
        rows = [(self.manifest_hash, k, q, _encode_hits(h), now) for q, h in results.items()]

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR IGNORE INTO hits VALUES (?, ?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        self._guarded(insert)

    # ------------------------------------------------------------------ Retriever
    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = list(queries)
        found = self.lookup(queries, k)
        missing = [q for q in dict.fromkeys(queries) if q not in found]
        if missing:
            self.store(dict(zip(missing, self.retriever.search(missing, k), strict=True)), k)
            found.update(self.lookup(missing, k))  # what is stored, even if another writer was first
        self.misses += len(missing)
        self.hits += len(queries) - len(missing)
        return [list(found[q]) for q in queries]

    def __len__(self) -> int:
        return self._guarded(lambda conn: conn.execute("SELECT COUNT(*) FROM hits WHERE manifest_hash = ?",
                                                       [self.manifest_hash]).fetchone()[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def __repr__(self) -> str:
        return f"CachedRetriever({self.path}, {self.manifest_hash}, hits={self.hits}, misses={self.misses})"


def _damaged(err: sqlite3.DatabaseError) -> bool:
    """SQLite's errors for a file that is not (or no longer) a usable database ("database is locked"
    and constraint errors are not damage)."""
    text = str(err).lower()
    return any(s in text for s in ("not a database", "malformed", "file is encrypted"))
