"""A served policy as an agent Backend: vLLM's OpenAI-compatible server over HTTP, token ids in and out.

`VLLMServerBackend` drives `vllm serve` (the server TRL 1.16's `VLLMClient` talks to and syncs the
training weights into each step; `trl vllm-serve` now only execs it) for evaluation, rejection
sampling (`agent.backend: vllm_server`, `agent.vllm_server_url`) and the RL stage in server mode
(`rl.vllm_mode: server`). It speaks the documented HTTP contract, nothing vLLM-internal:

    GET  /health          200 once the engine is up
    GET  /v1/models       {"data": [{"id": <served model name>, ...}, ...]}
    GET  /get_world_size  {"world_size": tensor_parallel x data_parallel}      (TRL's weight sync)
    POST /v1/completions  one request per row:
        {"model": <served name>, "prompt": [token ids], "max_tokens": <row budget>, "n": 1,
         "temperature": t, "top_p": p (1 when greedy), "seed": seed + row index,
         "stop": [stop strings], "stop_token_ids": [EOS ids], "include_stop_str_in_output": true,
         "skip_special_tokens": false, "logprobs": 0, "return_token_ids": true,
         "return_tokens_as_token_ids": true}
      -> {"choices": [{"token_ids": [...], "prompt_token_ids": [...], "text": ...,
                       "finish_reason": "stop" | "length", "stop_reason": <stop string> | <token id> | null,
                       "logprobs": {"tokens": ["token_id:<id>", ...], "token_logprobs": [...], ...}}]}

How a reply becomes a `Generation` (searchrl/agent/backends.py, the same rules as every backend):
`token_ids` are the sampled ids exactly (vLLM keeps every token up to the one that completes a stop
string, and a final EOS); `logprobs` are `token_logprobs`, one per id (vLLM's logprobs of the
distribution sampled from when the server runs `--logprobs-mode processed_logprobs`, as TRL starts
it), and the `token_id:<id>` strings must name the same ids, or the reply is refused;
finish = "length" on finish_reason "length", "stop" (with `stop` = the string) when stop_reason is a
string, else "eos" (EOS, or a stop token id). `text` is the decode of the ids without a final EOS.

One request per row, `concurrency` in flight (a thread pool over one pooled `requests` session):
rows need their own `max_tokens` and their own seed — one seed for a whole batch would give the
num_generations copies of a prompt the same sample — and vLLM batches concurrent requests itself
(continuous batching), so keep `concurrency` near the server's `--max-num-seqs`.

Failures: a refused connection or an HTTP 5xx is retried `retries` times (exponential backoff from
`backoff_s`, urllib3's Retry); then, and on any other bad answer, `VLLMServerError` — one line that
names the server URL (and the served models, when the model asked for is not one of them).

`serve_command` / `serve_env` build the `vllm serve` command line and environment the flow starts
for the RL stage (params `vllm_server`; flows/pipeline.py, searchrl/services.py).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from searchrl.agent.backends import Generation, decode, eos_token_ids
from searchrl.errors import ConfigError, SearchRLError

RETRY_STATUS = (500, 502, 503, 504)


class VLLMServerError(SearchRLError):
    """The policy server failed: unreachable, an HTTP error, a reply that breaks the contract."""


# ----------------------------------------------------------------------------- request / reply
def completion_request(prompt_ids: list[int], max_tokens: int, *, model: str, stop: list[str], eos_ids: list[int],
                       temperature: float, top_p: float, seed: int | None) -> dict:
    """The JSON body of one row's POST /v1/completions (see the module docstring)."""
    body: dict[str, Any] = {
        "model": model, "prompt": [int(t) for t in prompt_ids], "max_tokens": int(max_tokens), "n": 1,
        "temperature": float(temperature), "top_p": float(top_p) if temperature > 0 else 1.0,
        "stop": list(stop), "stop_token_ids": sorted(int(i) for i in eos_ids),
        "include_stop_str_in_output": True, "skip_special_tokens": False, "logprobs": 0,
        "return_token_ids": True, "return_tokens_as_token_ids": True,
    }
    if seed is not None:
        body["seed"] = int(seed)
    return body


def parse_choice(choice: dict, tokenizer, eos_ids: set[int], where: str = "the server") -> Generation:
    """One `choices[i]` of a /v1/completions reply as a Generation; VLLMServerError (naming `where`)
    when it lacks token ids or logprobs, or they disagree."""
    try:
        ids = [int(t) for t in choice["token_ids"]]
        lp = choice["logprobs"]
        lps = [float(x) if x is not None else float("nan") for x in lp["token_logprobs"]]
        tokens = lp.get("tokens")
        finish_reason, stop_reason = choice.get("finish_reason"), choice.get("stop_reason")
    except (KeyError, TypeError, ValueError) as err:
        raise VLLMServerError(f"{where}: a completion without token_ids / logprobs.token_logprobs ({err!s}); "
                              "is it vLLM's OpenAI server (return_token_ids needs vLLM >= 0.10.2)?") from None
    if len(lps) != len(ids):
        raise VLLMServerError(f"{where}: {len(ids)} token ids but {len(lps)} logprobs in one completion")
    if tokens is not None:
        named = [int(t.removeprefix("token_id:")) if isinstance(t, str) and t.startswith("token_id:") else None
                 for t in tokens]
        if named != ids:
            j = next((i for i, (a, b) in enumerate(zip(named, ids, strict=False)) if a != b),
                     min(len(named), len(ids)))
            raise VLLMServerError(f"{where}: the logprobs name other tokens than token_ids (from position {j}; "
                                  "does the server run with return_tokens_as_token_ids?)")
    if finish_reason == "length":
        finish, which = "length", None
    elif finish_reason == "stop":
        finish, which = ("stop", stop_reason) if isinstance(stop_reason, str) else ("eos", None)
    else:
        raise VLLMServerError(f"{where}: finish_reason {finish_reason!r} (expected 'stop' or 'length')")
    text_ids = ids[:-1] if finish == "eos" and ids and ids[-1] in eos_ids else ids
    return Generation(ids, decode(tokenizer, text_ids), lps, finish, which)


# ----------------------------------------------------------------------------- backend
class VLLMServerBackend:
    """searchrl Backend over a vLLM OpenAI-compatible server (see the module docstring).

    `server`: the base URL ("http://host:8000"), or an object with `.base_url` (and `.model`), e.g.
    TRL's `VLLMClient`, whose NCCL communicator keeps syncing the weights while the rows go through
    this client. `model`: the served model name to ask for ("" = the client's, else the first the
    server lists; a name it does not serve is an error naming both)."""

    def __init__(self, server, tokenizer, *, model: str = "", concurrency: int = 128, timeout_s: float = 600.0,
                 retries: int = 3, backoff_s: float = 1.0):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        url = server if isinstance(server, str) else getattr(server, "base_url", None)
        if not url:
            raise ConfigError("vLLM server: no base URL (agent.vllm_server_url, or rl.vllm_server_base_url)")
        if not re.match(r"^https?://", url):
            raise ConfigError(f"vLLM server: '{url}' is not an http(s) URL (e.g. http://127.0.0.1:8000)")
        self.base_url = url.rstrip("/").removesuffix("/v1")
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer)
        self.model = model or ("" if isinstance(server, str) else str(getattr(server, "model", "") or ""))
        self._model_checked = False
        self.concurrency = int(concurrency)
        self.timeout = (min(10.0, float(timeout_s)), float(timeout_s))  # (connect, read)
        self.retries = int(retries)
        retry = Retry(total=self.retries, connect=self.retries, read=0, status=self.retries, other=0,
                      status_forcelist=RETRY_STATUS, allowed_methods=None, backoff_factor=float(backoff_s),
                      raise_on_status=False)
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=max(1, self.concurrency))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.stats = {"requests": 0, "seconds": 0.0}

    @classmethod
    def from_config(cls, agent_cfg, tokenizer, policy_model: str = "") -> VLLMServerBackend:
        """The backend `agent.backend: vllm_server` names (agent.vllm_server_url, _concurrency, _timeout_s).
        It asks for agent.vllm_server_model, else `policy_model` (the model the stage would have loaded:
        `vllm serve Qwen/Qwen2.5-7B-Instruct` serves it under that name), so a server that serves another
        model — the base policy while the stage evaluates models/rl — is an error, not a silent swap."""
        return cls(agent_cfg.vllm_server_url, tokenizer, model=agent_cfg.vllm_server_model or policy_model,
                   concurrency=agent_cfg.vllm_server_concurrency, timeout_s=agent_cfg.vllm_server_timeout_s)

    # -- HTTP
    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import requests

        url = f"{self.base_url}{path}"
        where = f"vLLM server at {self.base_url}"
        try:
            resp = self.session.request(method, url, json=body, timeout=self.timeout)
        except requests.exceptions.RetryError as err:
            raise VLLMServerError(f"{where}: {method} {path} kept failing after {self.retries + 1} attempts "
                                  f"({_reason(err)})") from None
        except requests.exceptions.ConnectionError as err:
            raise VLLMServerError(f"{where}: unreachable after {self.retries + 1} attempts ({_reason(err)}); "
                                  "is `vllm serve` running there?") from None
        except requests.exceptions.Timeout:
            raise VLLMServerError(f"{where}: {method} {path} got no answer within {self.timeout[1]:.0f}s "
                                  "(agent.vllm_server_timeout_s)") from None
        except requests.exceptions.RequestException as err:
            raise VLLMServerError(f"{where}: {method} {path} failed ({_reason(err)})") from None
        if resp.status_code != 200:
            detail = " ".join(resp.text.split())[:300]
            raise VLLMServerError(f"{where}: {method} {path} answered HTTP {resp.status_code}: {detail}")
        try:
            return resp.json()
        except ValueError:
            raise VLLMServerError(f"{where}: {method} {path} did not answer JSON") from None

    def health(self) -> bool:
        """True when GET /health answers 200 (no retries, no error)."""
        from searchrl.services import probe

        return probe(f"{self.base_url}/health", timeout_s=self.timeout[0])

    def served_models(self) -> list[str]:
        """The model names the server serves (GET /v1/models)."""
        data = self._call("GET", "/v1/models").get("data") or []
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def world_size(self) -> int:
        """tensor_parallel x data_parallel workers of the server (GET /get_world_size)."""
        return int(self._call("GET", "/get_world_size")["world_size"])

    def _resolve_model(self) -> str:
        if self._model_checked:
            return self.model
        served = self.served_models()
        if not served:
            raise VLLMServerError(f"vLLM server at {self.base_url}: /v1/models lists no model")
        if not self.model:
            self.model = served[0]
        elif self.model not in served:
            raise VLLMServerError(f"vLLM server at {self.base_url} serves {', '.join(served)}, not "
                                  f"'{self.model}' (agent.vllm_server_model, or the server's --served-model-name)")
        self._model_checked = True
        return self.model

    # -- Backend
    def _one(self, ids: list[int], budget: int, stop: list[str], temperature: float, top_p: float,
             seed: int | None) -> Generation:
        if budget <= 0:
            return Generation([], "", [], "length", None)
        body = completion_request(ids, budget, model=self.model, stop=stop, eos_ids=sorted(self.eos_ids),
                                  temperature=temperature, top_p=top_p, seed=seed)
        reply = self._call("POST", "/v1/completions", body)
        choices = reply.get("choices") or []
        if len(choices) != 1:
            raise VLLMServerError(f"vLLM server at {self.base_url}: {len(choices)} choices for one prompt (n=1)")
        gen = parse_choice(choices[0], self.tokenizer, self.eos_ids, where=f"vLLM server at {self.base_url}")
        if len(gen.token_ids) > budget:
            raise VLLMServerError(f"vLLM server at {self.base_url}: {len(gen.token_ids)} tokens for max_tokens "
                                  f"{budget}")
        return gen

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], stop: list[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        """One Generation per prompt (token-id prompts); row i samples with seed `seed + i`."""
        n = len(prompts)
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
        if len(budgets) != n:
            raise ValueError(f"{len(budgets)} token budgets for {n} prompts")
        if all(b <= 0 for b in budgets):  # nothing to sample: no request at all
            return [Generation([], "", [], "length", None) for _ in budgets]
        self._resolve_model()
        t0 = time.perf_counter()
        stops = [s for s in stop if s]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, n)) as pool:
            futures = [pool.submit(self._one, list(p), b, stops, float(temperature), float(top_p),
                                   None if seed is None else int(seed) + i)
                       for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))]
            out = [f.result() for f in futures]
        self.stats["requests"] += sum(b > 0 for b in budgets)
        self.stats["seconds"] += time.perf_counter() - t0
        return out


def _reason(err: Exception) -> str:
    """The innermost cause of a requests / urllib3 error, short (no URL repetition, no object reprs)."""
    inner: Any = err
    while getattr(inner, "args", None) and isinstance(inner.args[0], Exception):
        inner = inner.args[0]
    reason = getattr(inner, "reason", None)
    text = str(reason if reason is not None else inner)
    text = re.sub(r"<[^>]+>: ", "", text)
    return text.split("] ")[-1][:200]


# ----------------------------------------------------------------------------- the server itself
PLACEHOLDERS = ("python", "model", "host", "port", "tensor_parallel_size", "gpu_memory_utilization", "dtype")


def serve_command(cfg, model: str, dtype: str = "auto") -> list[str]:
    """The command line of the flow-managed server (params `vllm_server.command` + `extra_args`) with
    its {placeholders} filled: {python} this interpreter, {model}, {host}, {port},
    {tensor_parallel_size}, {gpu_memory_utilization}, {dtype}. Other braces stay as they are (the
    JSON of --weight-transfer-config). A bare `vllm` is looked up next to this interpreter first;
    ConfigError when the executable is nowhere."""
    values = {"python": sys.executable, "model": model, "host": cfg.host, "port": str(cfg.port),
              "tensor_parallel_size": str(cfg.tensor_parallel_size),
              "gpu_memory_utilization": str(cfg.gpu_memory_utilization), "dtype": dtype}
    pattern = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
    cmd = [pattern.sub(lambda m: values[m.group(1)], str(arg)) for arg in [*cfg.command, *cfg.extra_args]]
    if not cmd:
        raise ConfigError("vllm_server.command: empty")
    exe = cmd[0]
    if os.sep not in exe:
        found = shutil.which(exe, path=os.path.dirname(sys.executable)) or shutil.which(exe)
        if found is None:
            hint = " (pip install -e '.[gpu]' on the GPU machine)" if exe == "vllm" else ""
            raise ConfigError(f"vllm_server.command: '{exe}' is not installed here{hint}")
        cmd[0] = found
    return cmd


def serve_env(cfg) -> dict[str, str]:
    """The server's environment additions: params `vllm_server.env` (VLLM_SERVER_DEV_MODE=1 by default:
    TRL's weight sync and cache reset endpoints need vLLM's dev mode) and CUDA_VISIBLE_DEVICES from
    `vllm_server.gpus` when set."""
    env = {str(k): str(v) for k, v in cfg.env.items()}
    if cfg.gpus:
        env["CUDA_VISIBLE_DEVICES"] = cfg.gpus
    return env

