"""Text generation backends for the search agent: token ids in, sampled token ids + logprobs out.

Every backend implements one call, `generate(prompts, max_new_tokens=..., stop=..., temperature=...,
top_p=..., seed=...) -> list[Generation]`, over *token-id* prompts. The rollout engine never
decodes-and-re-encodes history: it hands back `prompt_ids + completion ids so far` on every turn.

- `HFBackend` (searchrl/agent/hf_backend.py): transformers on CPU or CUDA with our own
  continuous-batching decode loop (per-row KV slots, per-row stop strings, finished rows leave the
  batch and waiting requests take their place; `generate_stream` lets a finished request come back
  with more tokens appended, e.g. retrieved documents; CUDA graphs on CUDA). Greedy when
  temperature == 0.
- `VLLMBackend` (searchrl/agent/vllm_offline.py): offline `vllm.LLM` (GPU).

This module is where callers get them: `make_backend` builds one from the config, and the shared
pieces are re-exported from their homes: `Generation`, `Backend`, `StopWatcher`
(searchrl/agent/generation.py) and the tokenizer / chat helpers (searchrl/agent/tokens.py).
`HFBackend` is imported on first use (it pulls in torch and transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from searchrl.agent.generation import Backend, Generation, StopWatcher
from searchrl.agent.tokens import (
    END_TOKENS,
    added_tokens,
    chat_prompt_ids,
    decode,
    encode,
    encode_untrusted,
    eos_token_ids,
)
from searchrl.agent.vllm_offline import VLLMBackend

if TYPE_CHECKING:
    from searchrl.agent.hf_backend import HFBackend

__all__ = ["CLOSED_BOOK_SYSTEM", "END_TOKENS", "Backend", "Generation", "HFBackend", "StopWatcher", "VLLMBackend",
           "added_tokens", "answer_closed_book", "chat_prompt_ids", "clean_short_answer", "decode", "encode",
           "encode_untrusted", "eos_token_ids", "make_backend"]


def __getattr__(name: str):
    if name == "HFBackend":  # lazily: torch + transformers
        from searchrl.agent.hf_backend import HFBackend

        return HFBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- factory + helpers
def make_backend(policy_cfg, agent_cfg, model=None, tokenizer=None) -> Backend:
    """Build the backend named by `agent_cfg.backend` (hf | vllm | vllm_server).

    `model` lets RL pass its live policy (a transformers model; its tokenizer via `tokenizer`, else
    loaded from `policy_cfg.model`), or an already built `vllm.LLM`.
    """
    from searchrl.models import causal_lm_path, load_tokenizer

    if agent_cfg.backend == "hf":
        from searchrl.agent.hf_backend import HFBackend

        if model is None:
            return HFBackend.load(policy_cfg.model, dtype=policy_cfg.dtype, device=policy_cfg.device,
                                  batch_size=agent_cfg.batch_size, kv_reuse=getattr(agent_cfg, "kv_reuse", True))
        tok = tokenizer if tokenizer is not None else load_tokenizer(policy_cfg.model)
        return HFBackend(model, tok, batch_size=agent_cfg.batch_size, kv_reuse=getattr(agent_cfg, "kv_reuse", True))
    if agent_cfg.backend == "vllm":
        if model is not None:
            return VLLMBackend("", llm=model, tokenizer=tokenizer)
        return VLLMBackend(causal_lm_path(policy_cfg.model), dtype=policy_cfg.dtype,
                           gpu_memory_utilization=agent_cfg.vllm_gpu_memory_utilization,
                           max_model_len=getattr(agent_cfg, "vllm_max_model_len", None) or None)
    if agent_cfg.backend == "vllm_server":  # a policy served by `vllm serve` (searchrl/agent/vllm_server.py)
        from searchrl.agent.vllm_server import VLLMServerBackend

        tok = tokenizer if tokenizer is not None else load_tokenizer(policy_cfg.model)
        return VLLMServerBackend.from_config(agent_cfg, tok, policy_model=policy_cfg.model)
    raise ValueError(f"agent.backend: unknown backend '{agent_cfg.backend}' (hf | vllm | vllm_server)")


CLOSED_BOOK_SYSTEM = ("Answer the question from your own knowledge. Reply with the answer only: a few words, "
                      "no explanation, no full sentence.")


def clean_short_answer(text: str) -> str:
    """First non-empty line, without an 'Answer:' lead-in or wrapping quotes / trailing full stop."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    for lead in ("final answer:", "answer:", "a:"):
        if line.lower().startswith(lead):
            line = line[len(lead):].strip()
    line = line.strip().strip('"').strip("'").strip()
    if line.endswith(".") and not line.endswith(".."):
        line = line[:-1].rstrip()
    return line


def answer_closed_book(backend: Backend, questions: list[str], max_new_tokens: int = 32,
                       batch_size: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, raw: bool = False) -> list[str]:
    """Short answers without retrieval (the prepare-stage knowledge probe and the 'direct' baseline):
    greedy by default; sampled at `temperature` > 0 (batch b seeded `seed + b`, so repeated questions in
    different batches differ). `raw`: the generated text as is instead of `clean_short_answer` of it."""
    tok = backend.tokenizer
    answers: list[str] = []
    for b, s in enumerate(range(0, len(questions), batch_size)):
        prompts = [chat_prompt_ids(tok, CLOSED_BOOK_SYSTEM, q) for q in questions[s: s + batch_size]]
        gens = backend.generate(prompts, max_new_tokens=max_new_tokens, stop=["\n\n"], temperature=temperature,
                                top_p=top_p, seed=None if seed is None else seed + b)
        answers.extend(g.text if raw else clean_short_answer(g.text) for g in gens)
    return answers
