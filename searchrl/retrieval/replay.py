"""The replay store of online search: every search-API reply, fetched page and page summary that an
online evaluation used, in one SQLite file, so the evaluation re-runs offline bit for bit.

    searches   (q, num)                                   -> the result list, as JSON
    pages      url                                        -> extracted title and text, or why it failed
    summaries  (summarizer, prompt version, query, url, sha256 of the page text) -> reply and summary
    meta       store_id (a random id made when the file is created), schema version

Online (searchrl/retrieval/web.py, `retrieval.web.mode: online`) the store is read first and written
on a miss, so an interrupted evaluation resumes without paying twice; in replay mode it is opened
read-only and a miss is an error naming the query. Failures are stored too (a page that was not HTML,
too large or unreachable), so a replay skips exactly the pages the online run skipped.

One file, rollback journal (no -wal / -shm files beside it): `dvc add data/web/replay.sqlite` tracks
it, and sharing the file shares the evaluation. Thread-safe (one connection behind a lock).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from searchrl.errors import ConfigError, SearchRLError
from searchrl.io import open_sqlite

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS searches (q TEXT NOT NULL, num INTEGER NOT NULL, results TEXT NOT NULL,
                                     recorded_at REAL NOT NULL, PRIMARY KEY (q, num));
CREATE TABLE IF NOT EXISTS pages (url TEXT PRIMARY KEY, ok INTEGER NOT NULL, status INTEGER, content_type TEXT,
                                  title TEXT NOT NULL, text TEXT NOT NULL, error TEXT NOT NULL,
                                  n_bytes INTEGER NOT NULL, recorded_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS summaries (summarizer TEXT NOT NULL, prompt_version TEXT NOT NULL, query TEXT NOT NULL,
                                      url TEXT NOT NULL, page_sha TEXT NOT NULL, reply TEXT NOT NULL, summary TEXT,
                                      recorded_at REAL NOT NULL,
                                      PRIMARY KEY (summarizer, prompt_version, query, url, page_sha));
"""


class ReplayMiss(SearchRLError):
    """Replay mode met a search, page or summary the store does not hold."""


@dataclass(frozen=True)
class Page:
    """A fetched web page: `ok` with its extracted text, or not with the reason (`error`)."""

    url: str
    ok: bool
    title: str = ""
    text: str = ""
    error: str = ""
    status: int | None = None
    content_type: str = ""
    n_bytes: int = 0

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


class ReplayStore:
    """The SQLite replay store at `path` (see the module docstring). `readonly`: replay mode."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly:
            if not self.path.is_file():
                raise ConfigError(f"retrieval.web.replay_path: no replay store at {self.path} (record one first with "
                                  "retrieval.web.mode: online)")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._db = open_sqlite(self.path, "retrieval.web.replay_path", check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            self._db.commit()
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        except sqlite3.DatabaseError as err:
            raise ConfigError(f"retrieval.web.replay_path: {self.path} is not a replay store ({err})") from None
        if row is None:
            raise ConfigError(f"retrieval.web.replay_path: {self.path} has no store id (not a replay store)")
        self.store_id = row[0]

    def _one(self, sql: str, args: tuple):
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _write(self, sql: str, args: tuple) -> None:
        if self.readonly:
            raise AssertionError("replay store opened read-only")
        with self._lock:
            self._db.execute(sql, args)
            self._db.commit()

    # -- searches
    def search(self, q: str, num: int) -> list[dict] | None:
        row = self._one("SELECT results FROM searches WHERE q = ? AND num = ?", (q, num))
        return None if row is None else json.loads(row[0])

    def put_search(self, q: str, num: int, results: list[dict]) -> None:
        self._write("INSERT OR REPLACE INTO searches VALUES (?, ?, ?, ?)",
                    (q, num, json.dumps(results, sort_keys=True, ensure_ascii=False), time.time()))

    # -- pages
    def page(self, url: str) -> Page | None:
        row = self._one("SELECT ok, title, text, error, status, content_type, n_bytes FROM pages WHERE url = ?", (url,))
        if row is None:
            return None
        ok, title, text, error, status, content_type, n_bytes = row
        return Page(url, bool(ok), title, text, error, status, content_type or "", n_bytes)

    def put_page(self, page: Page) -> None:
        self._write("INSERT OR REPLACE INTO pages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (page.url, int(page.ok), page.status, page.content_type, page.title, page.text, page.error,
                     page.n_bytes, time.time()))

    # -- summaries
    def summary(self, summarizer: str, prompt_version: str, query: str, page: Page) -> tuple[str, str | None] | None:
        """(reply, summary or None for an unrelated page), or None when not recorded."""
        row = self._one("SELECT reply, summary FROM summaries WHERE summarizer = ? AND prompt_version = ? AND "
                        "query = ? AND url = ? AND page_sha = ?", (summarizer, prompt_version, query, page.url, page.sha))
        return None if row is None else (row[0], row[1])

    def put_summary(self, summarizer: str, prompt_version: str, query: str, page: Page, reply: str,
                    summary: str | None) -> None:
        self._write("INSERT OR REPLACE INTO summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (summarizer, prompt_version, query, page.url, page.sha, reply, summary, time.time()))

    def counts(self) -> dict[str, int]:
        return {t: self._one(f"SELECT COUNT(*) FROM {t}", ())[0] for t in ("searches", "pages", "summaries")}

    def close(self) -> None:
        with self._lock:
            self._db.close()
