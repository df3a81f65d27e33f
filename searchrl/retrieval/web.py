"""Online web search for evaluation (`retrieval.backend: web`), as R1-Searcher's online evaluation
does it (METHOD.md B.8), behind the Retriever interface so the agent loop uses it unchanged.

For each query of `search(queries, k)` (queries run `concurrency` at a time):

    1. the search API, Serper's shape: POST {search_url} with header X-API-KEY and body
       {"q": query + " site:<site>", "num": results}; the reply's "organic" list of {link, title,
       snippet} (an empty or missing list: no results, so the protocol's no-results block);
    2. the first `pages` result URLs in rank order: fetch each page (streamed, at most
       `max_page_bytes`, an HTML / XHTML / plain-text content type only; other types, larger pages,
       HTTP errors and unreachable hosts are skipped with their reason), HTML to text with trafilatura;
    3. an LLM summary of each page for the query (our wording of B.7's instruction: a paragraph of the
       page's query-relevant content, not a bare answer, or "None" for an unrelated page; the page text
       cut at `max_page_chars`); pages summarised "None" are skipped;
    4. the summaries become the hits: Hit(id=url, title=page title, text=summary, score=1/rank). With
       `first_summary_only` (the reference's behaviour) the first relevant summary is the only document
       and later pages are not fetched; otherwise up to k summaries.

Every search reply, page and summary is recorded in the replay store (searchrl/retrieval/replay.py)
and read from it first; `mode: replay` never touches the network and a miss is an error naming the
query, so an online evaluation re-runs offline bit for bit. `manifest_hash` is derived from the
settings that shape the hits and the replay store's id.

Keys come from the environment, named in params (`search_key_env`, `summarizer_key_env`); online mode
checks them when the retriever is built, before any work, with one line naming the variable. They are
sent only in request headers and masked in any error text. The search API gets at most
`requests_per_second` requests (all threads together); 429 / 5xx replies and network errors are
retried `retries` times with exponential backoff (or the server's Retry-After); a refused key (401 /
403) or the last failed try stops the stage with one line naming the API and the query.

The summariser is an OpenAI-compatible chat endpoint (`summarizer: http(s)://host/v1`, model
`summarizer_model`) or a local model through our own backends (`summarizer: <dir, hub id or alias>`).

Differences from the reference: Wikipedia pages are fetched as HTML like any other (the reference
uses the `wikipedia` package's plain text); a summary counts as unrelated only when it is exactly
"None" (the reference drops any summary containing the letters "none", e.g. "nonetheless").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from searchrl.agent.protocols import strip_control_text
from searchrl.errors import ConfigError, SearchRLError
from searchrl.openai_http import RETRY_STATUS, OpenAIClient, redact, retry_after_s
from searchrl.retrieval.base import Hit
from searchrl.retrieval.replay import Page, ReplayMiss, ReplayStore

log = logging.getLogger(__name__)

PROMPT_VERSION = "summary-v1"
SUMMARY_PROMPT = """You read a web page for someone who searched the web, and report what the page says about their search.

Search query: {query}

Web page ({url}):
{page}

Instructions:
- Write one paragraph that summarises the information on this page that is relevant to the search query, using only what the page says. Give the relevant facts with their context; do not just state an answer.
- If nothing on the page is relevant to the query, write only the word None.

Reply in exactly this form:
Relevant content: <your paragraph, or None>"""
_ANSWER_MARK = re.compile(r"relevant content\s*:", re.IGNORECASE)
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


class WebSearchError(SearchRLError):
    """The search API, the summariser or a page fetch failed for good (after retries)."""


# ----------------------------------------------------------------------------- small pure pieces
def site_query(query: str, site: str) -> str:
    """The query as sent to the search API: R1-Searcher appends " site:en.wikipedia.org"."""
    return f"{query} site:{site}" if site else query


def organic_results(reply: dict) -> list[dict]:
    """The {link, title, snippet} entries of a Serper-style reply, in rank order; entries without a
    link are dropped, a reply without "organic" has none."""
    out = []
    for item in reply.get("organic") or []:
        if isinstance(item, dict) and isinstance(item.get("link"), str) and item["link"]:
            out.append({"link": item["link"], "title": str(item.get("title") or ""),
                        "snippet": str(item.get("snippet") or "")})
    return out


def summary_prompt(query: str, url: str, text: str, max_chars: int) -> str:
    # page text and query are untrusted: no control token of the summariser's chat template
    return SUMMARY_PROMPT.format(query=strip_control_text(query), url=strip_control_text(url),
                                 page=strip_control_text(text)[:max_chars])


def parse_summary(reply: str) -> str | None:
    """The paragraph after the last "Relevant content:" (the whole reply without that mark); None when
    it is "None" (any case, quotes / asterisks / a full stop around it) or empty."""
    marks = list(_ANSWER_MARK.finditer(reply))
    text = reply[marks[-1].end():] if marks else reply
    text = text.strip().strip("*\"'` ").strip()
    if not text or text.rstrip(".").strip().lower() == "none":
        return None
    return text


def page_text(body: bytes, content_type: str, url: str = "") -> tuple[str, str]:
    """(title, text) of a page: trafilatura's main-text extraction for HTML (all of the page's text
    when it finds no main text), the decoded body for text/plain."""
    if content_type.startswith("text/plain"):
        return "", body.decode("utf-8", "replace").strip()
    import trafilatura

    text = trafilatura.extract(body, url=url or None, include_comments=False, include_tables=True) or ""
    if not text.strip():
        text = trafilatura.html2txt(body) or ""
    meta = trafilatura.extract_metadata(body)
    title = (meta.title if meta is not None and meta.title else "") or ""
    return title.strip(), text.strip()


class RateLimiter:
    """At most `rate` acquisitions per second across threads (evenly spaced slots)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self.clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self.sleep(slot - now)


# ----------------------------------------------------------------------------- network clients
class SearchAPI:
    """A Serper-shaped web search API (see the module docstring)."""

    def __init__(self, url: str, key_env: str, num: int, timeout_s: float = 20.0, retries: int = 3,
                 backoff_s: float = 1.0, limiter: RateLimiter | None = None, sleep=time.sleep):
        self.url, self.key_env, self.num = url, key_env, num
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.limiter = limiter
        self.sleep = sleep
        self.stats = {"requests": 0, "retries": 0}
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def search(self, q: str) -> list[dict]:
        """The organic results for the query string as sent (site restriction included)."""
        import requests

        key = os.environ.get(self.key_env, "")
        headers = {"X-API-KEY": key, "Content-Type": "application/json"}
        body = json.dumps({"q": q, "num": self.num})
        for attempt in range(self.retries + 1):
            if self.limiter is not None:
                self.limiter.acquire()
            wait = None
            try:
                resp = requests.post(self.url, data=body, headers=headers, timeout=self.timeout_s)
            except requests.RequestException as err:
                problem = f"unreachable ({redact(str(err), key)[:200]})"
            else:
                self._count("requests")
                if resp.status_code == 200:
                    try:
                        return organic_results(resp.json())
                    except ValueError:
                        raise WebSearchError(f"search API {self.url}: the reply to {q!r} is not JSON") from None
                problem = f"HTTP {resp.status_code}: {redact(resp.text, key)[:200]}"
                if resp.status_code in (401, 403):
                    raise WebSearchError(f"search API {self.url} refused the key in ${self.key_env} "
                                         f"(HTTP {resp.status_code}) for query {q!r}")
                if resp.status_code not in RETRY_STATUS:
                    raise WebSearchError(f"search API {self.url}: {problem} for query {q!r}".replace("\n", " "))
                wait = retry_after_s(resp.headers.get("Retry-After"))
            if attempt == self.retries:
                raise WebSearchError(f"search API {self.url}: {problem} after {attempt + 1} attempts for query "
                                     f"{q!r}".replace("\n", " "))
            self._count("retries")
            self.sleep(min(wait if wait is not None else self.backoff_s * 2 ** attempt, 60.0))
        raise AssertionError("unreachable")


def fetch_page(url: str, *, max_bytes: int, timeout_s: float = 20.0, retries: int = 2, backoff_s: float = 1.0,
               user_agent: str = "searchrl", sleep=time.sleep) -> Page:
    """GET a page: streamed and abandoned past `max_bytes` (the Content-Length header is checked
    first), a text content type only, 429 / 5xx and network errors retried. Never raises for the
    page's own problems: they come back as `Page(ok=False, error=...)`."""
    import requests

    if not url.startswith(("http://", "https://")):
        return Page(url, False, error="not an http(s) URL")
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff_s * 2 ** (attempt - 1))
        try:
            with requests.get(url, stream=True, timeout=timeout_s, headers={"User-Agent": user_agent}) as resp:
                ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if resp.status_code != 200:
                    problem = f"HTTP {resp.status_code}"
                    if resp.status_code in RETRY_STATUS:
                        continue
                    return Page(url, False, error=problem, status=resp.status_code, content_type=ctype)
                if not ctype.startswith(TEXT_TYPES):
                    return Page(url, False, error=f"not HTML ({ctype or 'no content type'})", status=200,
                                content_type=ctype)
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    return Page(url, False, error=f"larger than {max_bytes} bytes ({declared} declared)", status=200,
                                content_type=ctype)
                body = bytearray()
                for chunk in resp.iter_content(chunk_size=65536):
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        return Page(url, False, error=f"larger than {max_bytes} bytes", status=200,
                                    content_type=ctype, n_bytes=len(body))
        except requests.RequestException as err:
            problem = f"unreachable ({type(err).__name__})"
            continue
        title, text = page_text(bytes(body), ctype, url)
        return Page(url, True, title=title, text=text, status=200, content_type=ctype, n_bytes=len(body))
    return Page(url, False, error=problem)


class ChatSummarizer:
    """Page summaries from an OpenAI-compatible chat endpoint (temperature 0)."""

    def __init__(self, base_url: str, model: str, key_env: str, max_tokens: int = 512, timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 1.0, sleep=time.sleep):
        self.id = model or base_url
        self.model, self.max_tokens = model, max_tokens
        self.client = OpenAIClient(base_url, key_env, label="summarizer", error=WebSearchError, timeout_s=timeout_s,
                                   max_retries=retries, backoff_s=backoff_s, sleep=sleep)
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()

    def __call__(self, prompt: str) -> str:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.model:
            body["model"] = self.model
        reply = self.client.post("chat/completions", body)
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise WebSearchError(f"summarizer {self.client.base_url}: unexpected reply (no choices[0].message."
                                 f"content): {str(reply)[:200]}") from None
        with self._lock:
            for k in self.usage:
                self.usage[k] += int((reply.get("usage") or {}).get(k) or 0)
        return text


class BackendSummarizer:
    """Page summaries from a local model through our backends (greedy; one call at a time)."""

    def __init__(self, backend_factory: Callable[[], object], name: str, max_tokens: int = 512):
        self.id = f"local:{name}"
        self._factory, self._backend = backend_factory, None
        self.max_tokens = max_tokens
        self._lock = threading.Lock()

    def __call__(self, prompt: str) -> str:
        from searchrl.agent.backends import chat_prompt_ids

        with self._lock:  # a local backend is not thread-safe; it is loaded on the first summary
            if self._backend is None:
                self._backend = self._factory()
            ids = chat_prompt_ids(self._backend.tokenizer, None, prompt)  # the page text is untrusted
            return self._backend.generate([ids], max_new_tokens=self.max_tokens, temperature=0.0)[0].text


# ----------------------------------------------------------------------------- the retriever
class WebRetriever:
    """Retriever over the web (see the module docstring). `search_api` / `summarizer` / `fetch` are
    None in replay mode (nothing may reach the network)."""

    def __init__(self, store: ReplayStore, *, site: str, num: int, pages: int, first_summary_only: bool,
                 max_page_chars: int, summarizer_id: str, search_api: SearchAPI | None = None,
                 summarizer: Callable[[str], str] | None = None, fetch: Callable[[str], Page] | None = None,
                 concurrency: int = 4):
        self.store = store
        self.site, self.num, self.pages = site, num, pages
        self.first_summary_only, self.max_page_chars = first_summary_only, max_page_chars
        self.summarizer_id = summarizer_id
        self.search_api, self.summarizer, self.fetch = search_api, summarizer, fetch
        self.concurrency = concurrency
        self.online = search_api is not None
        self.stats = {"queries": 0, "searches_recorded": 0, "pages_fetched": 0, "pages_skipped": 0,
                      "summaries_made": 0, "unrelated_pages": 0}
        self._lock = threading.Lock()
        settings = {"backend": "web", "store": store.store_id, "site": site, "num": num, "pages": pages,
                    "first_summary_only": first_summary_only, "max_page_chars": max_page_chars,
                    "summarizer": summarizer_id, "prompt": PROMPT_VERSION}
        self.manifest_hash = "web-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _miss(self, what: str, query: str) -> ReplayMiss:
        return ReplayMiss(f"retrieval.web replay: no recorded {what} for query {query!r} in {self.store.path} "
                          "(record it online: retrieval.web.mode: online)")

    def results(self, query: str) -> list[dict]:
        q = site_query(query, self.site)
        found = self.store.search(q, self.num)
        if found is not None:
            return found
        if not self.online:
            raise self._miss("search", query)
        found = self.search_api.search(q)
        self.store.put_search(q, self.num, found)
        self._count("searches_recorded")
        return found

    def page(self, url: str, query: str) -> Page:
        found = self.store.page(url)
        if found is not None:
            return found
        if not self.online:
            raise self._miss(f"page {url}", query)
        page = self.fetch(url)
        self.store.put_page(page)
        self._count("pages_fetched")
        if not page.ok:
            log.info("web: skipped %s (%s)", url, page.error)
        return page

    def summary(self, query: str, page: Page) -> str | None:
        found = self.store.summary(self.summarizer_id, PROMPT_VERSION, query, page)
        if found is not None:
            return found[1]
        if not self.online:
            raise self._miss(f"summary of {page.url}", query)
        reply = self.summarizer(summary_prompt(query, page.url, page.text, self.max_page_chars))
        summary = parse_summary(reply)
        self.store.put_summary(self.summarizer_id, PROMPT_VERSION, query, page, reply, summary)
        self._count("summaries_made")
        return summary

    def search_one(self, query: str, k: int) -> list[Hit]:
        self._count("queries")
        if not query.strip():
            return []
        hits: list[Hit] = []
        seen: set[str] = set()
        results = [r for r in self.results(query) if not (r["link"] in seen or seen.add(r["link"]))]
        for rank, result in enumerate(results[: self.pages], start=1):
            page = self.page(result["link"], query)
            if not page.ok or not page.text.strip():
                self._count("pages_skipped")
                continue
            summary = self.summary(query, page)
            if summary is None:
                self._count("unrelated_pages")
                continue
            hits.append(Hit(page.url, page.title or result["title"], summary, 1.0 / rank))
            if self.first_summary_only or len(hits) >= k:
                break
        return hits[:k]

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        if len(queries) <= 1 or self.concurrency == 1:
            return [self.search_one(q, k) for q in queries]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(queries))) as pool:
            return list(pool.map(lambda q: self.search_one(q, k), queries))

    def __repr__(self) -> str:
        return f"WebRetriever({'online' if self.online else 'replay'}, store={self.store.path}, {self.stats})"


def require_key(env: str, what: str, key_name: str) -> None:
    """One line naming the variable when an online run's key is not set."""
    if env and not os.environ.get(env):
        raise ConfigError(f"retrieval.web: the {what} key is missing: set the environment variable {env} "
                          f"(retrieval.web.{key_name} names it), or use retrieval.web.mode: replay")


def open_web_retriever(params) -> WebRetriever:
    """The web retriever of params.retrieval.web; online mode checks both keys before anything else."""
    cfg = params.retrieval.web
    http_summarizer = cfg.summarizer.startswith(("http://", "https://"))
    summarizer_id = cfg.summarizer_model if http_summarizer else f"local:{cfg.summarizer}"
    if cfg.mode == "replay":
        store = ReplayStore(cfg.replay_path, readonly=True)
        log.info("retrieval: web replay from %s (%s)", cfg.replay_path, store.counts())
        return WebRetriever(store, site=cfg.site, num=cfg.results, pages=cfg.pages,
                            first_summary_only=cfg.first_summary_only, max_page_chars=cfg.max_page_chars,
                            summarizer_id=summarizer_id, concurrency=cfg.concurrency)
    require_key(cfg.search_key_env, "search API", "search_key_env")
    if http_summarizer:
        require_key(cfg.summarizer_key_env, "summarizer API", "summarizer_key_env")
        summarizer = ChatSummarizer(cfg.summarizer, cfg.summarizer_model, cfg.summarizer_key_env,
                                    cfg.summarizer_max_tokens, timeout_s=cfg.timeout_s * 6, retries=cfg.retries,
                                    backoff_s=cfg.backoff_s)
    else:
        from searchrl.agent.backends import make_backend

        summarizer = BackendSummarizer(
            lambda: make_backend(params.policy.model_copy(update={"model": cfg.summarizer}), params.agent),
            cfg.summarizer, cfg.summarizer_max_tokens)
    api = SearchAPI(cfg.search_url, cfg.search_key_env, cfg.results, cfg.timeout_s, cfg.retries, cfg.backoff_s,
                    RateLimiter(cfg.requests_per_second))

    def fetch(url: str) -> Page:
        return fetch_page(url, max_bytes=cfg.max_page_bytes, timeout_s=cfg.timeout_s, retries=cfg.retries,
                          backoff_s=cfg.backoff_s, user_agent=cfg.user_agent)

    store = ReplayStore(cfg.replay_path)
    log.info("retrieval: web search %s (site %s), summaries by %s, recorded in %s", cfg.search_url,
             cfg.site or "any", summarizer_id, cfg.replay_path)
    return WebRetriever(store, site=cfg.site, num=cfg.results, pages=cfg.pages,
                        first_summary_only=cfg.first_summary_only, max_page_chars=cfg.max_page_chars,
                        summarizer_id=summarizer_id, search_api=api, summarizer=summarizer, fetch=fetch,
                        concurrency=cfg.concurrency)
