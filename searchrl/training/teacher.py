"""Teachers for rejection sampling: any model other than the policy, run as an agent Backend so the
one rollout loop (searchrl/agent/engine.py) drives it, with real retrieval in between.

`make_teacher_backend(spec, ...)` picks the client from the spec string:

    a local dir or hub id   HFBackend on that model (its own tokenizer and chat template; the SFT
                            stage re-tokenises its trajectories with the student tokenizer)
    vllm:<dir or hub id>    VLLMBackend (GPU machines)
    http(s)://host/v1       OpenAIBackend: an OpenAI-compatible server

`OpenAIBackend` turns the engine's token-id prompts back into text with the *student* tokenizer and
sends one request per row (a thread pool, `concurrency` at a time):

- api="completions" (`POST {base}/completions`): the decoded prompt as is, i.e. the student's chat
  layout plus the assistant text so far. Right for base models and for teachers that share the
  student's chat format (a Qwen2.5-7B teacher for a Qwen2.5-0.5B student).
- api="chat" (`POST {base}/chat/completions`): system and user messages recovered from the prompt
  (`ChatPromptParser`), and the assistant text so far as a final assistant message continued by the
  server (`continue_final_message`, vLLM's extension; the first turn needs no extension).

The returned text is tokenised with the student tokenizer (so trajectories hold student tokens) and
its logprobs are unknown (zeros). Servers drop the matched stop string from the text; the backend
puts it back: the server's `stop_reason` when given, else the protocol's open tag that the text left
unclosed (a query, or the answer); a plain stop with nothing open is an end-of-sequence.

The API key is read from the environment variable named in params (`sample.teacher_api_key_env`) at
request time, sent only in the Authorization header, and never logged, stored or put in an error
message (a server that echoes it back has it masked).

`ScriptBackend` "generates" pre-written segment texts (the Knowledge World oracle of
searchrl/training/sampling.py): segment k of a rollout is the one written after k stop strings.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from searchrl.agent.backends import Generation, decode, encode_untrusted, eos_token_ids
from searchrl.agent.protocols import Protocol
from searchrl.errors import ConfigError, SearchRLError
from searchrl.openai_http import OpenAIClient

log = logging.getLogger(__name__)

_SYS_MARK = "SYSTEMMESSAGEMARK"
_USER_MARK = "USERMESSAGEMARK"


class TeacherError(SearchRLError):
    """The teacher endpoint failed (unreachable, HTTP error, unexpected reply)."""


# ----------------------------------------------------------------------------- prompts
class ChatPromptParser:
    """Recovers (system, user, assistant text so far) from a one-turn chat prompt rendered by
    `searchrl.agent.backends.chat_prompt_ids`: the tokenizer's template is rendered once with marker
    words in place of the messages, which splits it into the fixed text around them."""

    def __init__(self, tokenizer):
        from searchrl.agent.backends import chat_prompt_ids

        self.tokenizer = tokenizer
        frame = decode(tokenizer, chat_prompt_ids(tokenizer, _SYS_MARK, _USER_MARK))
        if frame.count(_SYS_MARK) != 1 or frame.count(_USER_MARK) != 1:
            raise ConfigError("teacher: cannot locate the system and user messages in the student's chat "
                              "template; use sample.teacher_api=completions")
        self.head, rest = frame.split(_SYS_MARK)
        self.middle, self.tail = rest.split(_USER_MARK)

    def parse(self, ids: list[int]) -> tuple[str, str, str]:
        text = decode(self.tokenizer, ids)
        if not text.startswith(self.head):
            raise TeacherError("teacher: a prompt does not start with the student's chat template")
        body = text[len(self.head):]
        i = body.find(self.middle)
        j = body.find(self.tail, i + len(self.middle)) if i >= 0 else -1
        if i < 0 or j < 0:
            raise TeacherError("teacher: a prompt does not follow the student's chat template")
        return body[:i], body[i + len(self.middle): j], body[j + len(self.tail):]


def _finish_text(text: str, stop: list[str], protocol: Protocol, so_far: str,
                 stop_reason: str | None, finish_reason: str | None) -> tuple[str, str, str | None]:
    """(text with the matched stop string restored, finish, stop) from an HTTP reply."""
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if hits:  # the server kept the stop string in the text: cut right after the first one
        pos, s = min(hits)
        return text[: pos + len(s)], "stop", s
    if finish_reason == "length":
        return text, "length", None
    if isinstance(stop_reason, str) and stop_reason in stop:
        return text + stop_reason, "stop", stop_reason
    full = so_far + text
    for open_, close in ((protocol.query_open, protocol.query_close), (protocol.answer_open, protocol.answer_close)):
        if close in stop and full.count(open_) > full.count(close):
            return text + close, "stop", close
    return text, "eos", None


# ----------------------------------------------------------------------------- HTTP
class OpenAIBackend:
    """An OpenAI-compatible completions / chat endpoint as an agent Backend (see the module docstring)."""

    def __init__(self, base_url: str, tokenizer, protocol: Protocol, api: str = "completions", model: str = "",
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout_s: float = 120.0,
                 max_retries: int = 3):
        if api not in ("completions", "chat"):
            raise ConfigError(f"sample.teacher_api: '{api}' (completions | chat)")
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.api = api
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.parser = ChatPromptParser(tokenizer) if api == "chat" else None
        eos = eos_token_ids(tokenizer)
        self.eos_id = min(eos) if eos else None
        self.client = OpenAIClient(self.base_url, api_key_env, label="teacher", error=TeacherError,
                                   timeout_s=timeout_s, max_retries=max_retries)
        self.stats = {"requests": 0, "retries": 0, "seconds": 0.0}
        if not os.environ.get(api_key_env):
            log.info("teacher: $%s is not set; requests to %s carry no Authorization header", api_key_env,
                     self.base_url)

    def _request(self, ids: list[int], budget: int, stop: list[str], temperature: float, top_p: float,
                 seed: int | None) -> Generation:
        if budget <= 0:
            return Generation([], "", [], "length", None)
        body: dict = {"max_tokens": int(budget), "temperature": float(temperature), "stop": list(stop) or None}
        if temperature > 0:
            body["top_p"] = float(top_p)
        if seed is not None:
            body["seed"] = int(seed)
        if self.model:
            body["model"] = self.model
        if self.api == "completions":
            so_far = ""
            body["prompt"] = decode(self.tokenizer, ids)
            reply = self.client.post("completions", body)
        else:
            system, user, so_far = self.parser.parse(ids)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            if so_far:
                messages.append({"role": "assistant", "content": so_far})
                body.update(continue_final_message=True, add_generation_prompt=False)
            body["messages"] = messages
            reply = self.client.post("chat/completions", body)
        try:
            choice = reply["choices"][0]
            text = choice["text"] if self.api == "completions" else choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise TeacherError(f"teacher {self.base_url}: unexpected reply (no choices[0] text): "
                               f"{str(reply)[:200]}") from None
        self.stats["requests"] += 1
        text, finish, which = _finish_text(text or "", list(stop), self.protocol, so_far, choice.get("stop_reason"),
                                           choice.get("finish_reason"))
        tokens = encode_untrusted(self.tokenizer, text, allow=self.protocol.tags)  # the teacher's text is not ours
        if finish == "eos" and self.eos_id is not None:
            tokens.append(self.eos_id)
        if len(tokens) > budget:  # the teacher's tokens are not the student's: cap in student tokens
            tokens, finish, which = tokens[:budget], "length", None
        text_ids = tokens[:-1] if finish == "eos" and self.eos_id is not None else tokens
        return Generation(tokens, decode(self.tokenizer, text_ids), [0.0] * len(tokens), finish, which)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], stop: list[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        n = len(prompts)
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(n, 1))) as pool:
            futures = [pool.submit(self._request, list(p), b, list(stop), temperature, top_p,
                                   None if seed is None else seed + i)
                       for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))]
            out = [f.result() for f in futures]
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["retries"] = self.client.stats["retries"]
        return out


# ----------------------------------------------------------------------------- scripted
class ScriptBackend:
    """Writes fixed segment texts, tokenised with a real tokenizer, as a backend would report them.

    `scripts` maps a question (the user message of the prompt) to its segment texts; each segment
    but the last ends with a stop string (a query close), the last with the answer close. Segment k
    is written after k stop strings in the rollout's history. Logprobs are 0 (nothing was sampled).
    The texts come from data (gold answers, passages), so only the strings in `allow` (the protocol's
    tags) may become added tokens."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], allow: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.allow = tuple(allow)
        self.parser = ChatPromptParser(tokenizer)

    def _emit(self, segment: str, stop: list[str], budget: int) -> Generation:
        ids = encode_untrusted(self.tokenizer, segment, allow=self.allow)
        text = decode(self.tokenizer, ids)
        if text != segment:
            raise ConfigError("oracle: the tokenizer does not reproduce text exactly (decode(encode(x)) != x); "
                              "the oracle sampler needs a byte-level tokenizer")
        hits = [(text.find(s), s) for s in stop if s and s in text]
        which = min(hits)[1] if hits else None
        finish = "stop" if which else "length"
        if len(ids) > budget:
            ids, finish, which = ids[:budget], "length", None
        return Generation(ids, decode(self.tokenizer, ids), [0.0] * len(ids), finish, which)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], stop: list[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        n = len(prompts)
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
        out = []
        for ids, budget in zip(prompts, budgets, strict=True):
            _, user, so_far = self.parser.parse(list(ids))
            segments = self.scripts.get(user.strip())
            if segments is None:
                raise KeyError(f"oracle: no script for question {user[:80]!r}")
            k = sum(so_far.count(s) for s in stop if s)
            out.append(self._emit(segments[min(k, len(segments) - 1)], list(stop), budget))
        return out


# ----------------------------------------------------------------------------- factory
def make_teacher_backend(spec: str, *, student_tokenizer, protocol: Protocol, policy_cfg, agent_cfg,
                         api: str = "completions", served_model: str = "", api_key_env: str = "OPENAI_API_KEY",
                         concurrency: int = 8, timeout_s: float = 120.0):
    """A Backend for the teacher named by `spec` (see the module docstring)."""
    from searchrl.agent.backends import HFBackend, VLLMBackend
    from searchrl.models import causal_lm_path

    if not spec:
        raise ConfigError("teacher: no model given (a local dir, hub id, vllm:<id> or http(s)://host/v1)")
    if spec.startswith(("http://", "https://")):
        return OpenAIBackend(spec, student_tokenizer, protocol, api=api, model=served_model,
                             api_key_env=api_key_env, concurrency=concurrency, timeout_s=timeout_s)
    if spec.startswith("vllm:"):
        return VLLMBackend(causal_lm_path(spec.removeprefix("vllm:")), dtype=policy_cfg.dtype,
                           gpu_memory_utilization=agent_cfg.vllm_gpu_memory_utilization)
    return HFBackend.load(spec, dtype=policy_cfg.dtype, device=policy_cfg.device, batch_size=agent_cfg.batch_size)
