"""A local OpenAI-compatible chat-completions server standing in for a judge endpoint in tests.

    with JudgeStandin(key="sk-...") as s:      # s.url == "http://127.0.0.1:PORT/v1"
        s.fail_next(429, count=2, retry_after="0")
        ... POST s.url + "/chat/completions" ...
        s.requests                              # every request: path, Authorization header, JSON body

It grades like a careful judge would on easy cases: the reply is "True" when a gold answer (the
text after "Golden answer...:", aliases split on " | ") occurs in the predicted answer (case-folded),
else "False"; `replies` maps a predicted answer to a fixed reply instead ("Maybe", "" ...). Replies
carry OpenAI's `usage` (whitespace word counts as token counts). A wrong or missing key is a 401.
`delay_s` holds each reply that long, so concurrent requests overlap (`max_in_flight` records it).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeStandin:
    def __init__(self, key: str | None = None, replies: dict[str, str] | None = None, delay_s: float = 0.0):
        self.key = key
        self.replies = dict(replies or {})
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.failures: list[tuple[int, str | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def fail_next(self, status: int, count: int = 1, retry_after: str | None = None) -> None:
        """The next `count` requests answer HTTP `status` (with a Retry-After header when given)."""
        with self.lock:
            self.failures.extend([(status, retry_after)] * count)

    def grade(self, prompt: str) -> str:
        fields = dict(re.findall(r"^(Question|Golden answer[^:]*|Predicted answer): (.*)$", prompt, flags=re.M))
        pred = fields.get("Predicted answer", "")
        if pred in self.replies:
            return self.replies[pred]
        golds = next((v for k, v in fields.items() if k.startswith("Golden answer")), "").split(" | ")
        return "True" if any(g and g.lower() in pred.lower() for g in golds) else "False"

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with standin.lock:
                    standin.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                             "body": body})
                    failure = standin.failures.pop(0) if standin.failures else None
                    standin.in_flight += 1
                    standin.max_in_flight = max(standin.max_in_flight, standin.in_flight)
                try:
                    time.sleep(standin.delay_s)
                    if standin.key is not None and self.headers.get("Authorization") != f"Bearer {standin.key}":
                        self._reply(401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
                    elif failure is not None:
                        headers = {"Retry-After": failure[1]} if failure[1] is not None else {}
                        self._reply(failure[0], {"error": {"message": "try again later"}}, headers)
                    elif not self.path.endswith("/chat/completions"):
                        self._reply(404, {"error": {"message": f"no route {self.path}"}})
                    else:
                        prompt = body["messages"][-1]["content"]
                        reply = standin.grade(prompt)
                        self._reply(200, {"id": "chatcmpl-standin", "object": "chat.completion",
                                          "model": body.get("model", ""),
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": reply}}],
                                          "usage": {"prompt_tokens": len(prompt.split()),
                                                    "completion_tokens": len(reply.split()),
                                                    "total_tokens": len(prompt.split()) + len(reply.split())}})
                finally:
                    with standin.lock:
                        standin.in_flight -= 1

            def _reply(self, code: int, obj: dict, headers: dict | None = None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self) -> JudgeStandin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
