"""One small client for OpenAI-compatible HTTP endpoints (vLLM, OpenAI, any server with the same shape).

Shared by the rejection-sampling teacher (searchrl/training/teacher.py) and the LLM judge
(searchrl/judge.py): `OpenAIClient(base_url, api_key_env).post("chat/completions", body) -> dict`.

- The API key is read from the environment variable `api_key_env` at request time, sent only in the
  `Authorization: Bearer` header and never logged, stored or put in an error message (a server that
  echoes it back has it masked as ***). `api_key_env=""` sends no header (local servers).
- 408/409/429/5xx replies and network errors are retried `max_retries` times, waiting
  `backoff_s * 2**attempt` seconds (at most `max_backoff_s`), or the server's `Retry-After` seconds
  when it sends one (same cap). Any other HTTP error, or the last failed try, is one `error` line
  naming the label, the URL and the status.
- `stats`: requests that got a reply, retries; counters are updated under a lock (callers use threads).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from searchrl.errors import SearchRLError

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


def redact(text: str, key: str) -> str:
    """`text` with the secret `key` masked as *** (nothing to mask when `key` is empty)."""
    return text.replace(key, "***") if key else text


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds ("3", "1.5"); None for a missing value or
    an HTTP date (then the exponential backoff applies)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAIClient:
    """POST JSON to `{base_url}/{path}` with retries (see the module docstring)."""

    def __init__(self, base_url: str, api_key_env: str = "", *, label: str = "endpoint",
                 error: type[SearchRLError] = SearchRLError, timeout_s: float = 120.0, max_retries: int = 3,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.label = label
        self.error = error
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.stats = {"requests": 0, "retries": 0}
        self._lock = threading.Lock()

    def key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        with self._lock:
            self.stats["retries"] += 1
        delay = retry_after if retry_after is not None else self.backoff_s * 2.0 ** attempt
        self.sleep(min(delay, self.max_backoff_s))

    def post(self, path: str, body: dict) -> dict:
        key = self.key()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode("utf-8")
        url = f"{self.base_url}/{path}"
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                with self._lock:
                    self.stats["requests"] += 1
                return reply
            except urllib.error.HTTPError as err:
                detail = redact(err.read().decode("utf-8", "replace")[:300], key)
                if err.code in RETRY_STATUS and attempt < self.max_retries:
                    self._wait(attempt, retry_after_s(err.headers.get("Retry-After") if err.headers else None))
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise self.error(f"{self.label} {url}: HTTP {err.code}{tries}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                if attempt < self.max_retries:
                    self._wait(attempt, None)
                    continue
                reason = redact(str(getattr(err, "reason", err)), key)
                raise self.error(f"{self.label} {url}: unreachable after {attempt + 1} attempts ({reason})") from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise self.error(f"{self.label} {url}: the reply is not JSON") from None
        raise AssertionError("unreachable")
