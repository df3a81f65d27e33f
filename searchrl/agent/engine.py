"""The batched multi-turn rollout loop with retrieval in it (evaluation, rejection sampling, RL).

One loop for every protocol (searchrl/agent/protocols.py) and backend (searchrl/agent/backends.py).
A rollout alternates model segments and environment segments:

    the model generates until a stop string (query close / answer close), EOS, or its token budget;
    the rollouts that stopped together hand every query among them to ONE
    `retriever.search(queries, k)` call (identical queries are sent once);
    each searching rollout gets its document block appended as an env segment and goes on;
    until every rollout has finished.

Scheduling (`agent.continuous_batching`). With a backend that streams (HFBackend.generate_stream)
a rollout whose documents are in rejoins the running batch at once, while the others keep decoding,
and new rollouts fill rows as soon as they free up: the batch never waits for its slowest row. Any
other backend (vLLM, whose automatic prefix caching and scheduler do the same inside one call; the
test fakes), or `continuous_batching=false`, runs synchronous rounds: every unfinished rollout in one
`generate` call, then one retrieval call for the round. The tokens are the same either way (greedy).

Token-in, token-out: the next prompt of a rollout is `prompt_ids + every completion id so far`
(the model's tokens exactly as sampled, plus the env tokens); history is never decoded and
re-encoded. An env segment is tokenised on its own, and the trajectory's rendered text is
`decode(model tokens) + env text` segment by segment (a final EOS token stays in the model's token
ids, but not in its text). `Trajectory.env_mask` is 0 on exactly the inserted blocks.

Caps (AgentCfg): `max_retrievals` (a query past the cap ends the rollout, finish "max_retrievals"),
`max_segment_tokens` (one segment), `max_total_tokens` (all completion tokens, model + env: a
segment gets `min(max_segment_tokens, room left)`; a document block that would not leave room for
at least one more model token is not inserted and the rollout ends with finish "length").
`stop_at_answer` (default true) also stops at the answer's closing tag; false lets the model end the
rollout itself (EOS), as R1-Searcher's training rollouts do.
Finish reasons: answered | max_retrievals | length | malformed (EOS without an answer, a query
close tag without its open tag, an empty query where the protocol makes it fatal, or an answer
close tag without its open tag).

With the HF backend the KV of each rollout's history is kept (`backend.session()`), so a rollout that
goes on after a retrieval costs only its new tokens.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from searchrl.agent.backends import added_tokens, encode_untrusted
from searchrl.agent.protocols import Protocol, get_protocol
from searchrl.agent.trajectory import Segment, Trajectory

log = logging.getLogger(__name__)


@dataclass
class _Rollout:
    traj: Trajectory
    ids: list[int]  # prompt + completion so far (what the next segment is conditioned on)
    used: int = 0  # completion tokens so far (model + env)
    done: bool = False


@dataclass
class RolloutStats:
    rollouts: int = 0
    rounds: int = 0  # batches of stopped rollouts handled: synchronous rounds, or (continuous) decode steps
    generated_tokens: int = 0  # model tokens
    env_tokens: int = 0
    generate_seconds: float = 0.0
    retrieval_seconds: float = 0.0
    retrieval_calls: int = 0
    queries: int = 0
    unique_queries: int = 0
    wall_seconds: float = 0.0
    finish: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def retrieval_share(self) -> float:
        return self.retrieval_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["tokens_per_second"] = round(self.tokens_per_second, 2)
        d["retrieval_share"] = round(self.retrieval_share, 4)
        return d


def _as_question(q: Any, i: int) -> tuple[str, str]:
    if hasattr(q, "question") and hasattr(q, "id"):
        return str(q.id), q.question
    if isinstance(q, dict):
        return str(q.get("id", i)), q["question"]
    if isinstance(q, (tuple, list)) and len(q) == 2:
        return str(q[0]), q[1]
    if isinstance(q, str):
        return str(i), q
    raise TypeError(f"question {i}: expected a QARecord, (id, question) or str, got {type(q).__name__}")


def run_rollouts(backend, retriever, protocol: Protocol | str, questions: list, n: int = 1,
                 temperature: float = 0.0, agent_cfg=None, seed: int = 0, top_p: float = 1.0,
                 stats: RolloutStats | None = None, source: str = "policy") -> list[Trajectory]:
    """Roll out `n` samples for each question; returns len(questions) * n trajectories, question-major
    (all samples of question 0, then question 1, ...), `sample_index` = 0..n-1.

    `retriever` follows searchrl.retrieval.base.Retriever (`search(queries, k) -> list[list[Hit]]`).
    `stats`, when given, is filled with throughput numbers (also logged).
    """
    from searchrl.config import AgentCfg

    cfg = agent_cfg if agent_cfg is not None else AgentCfg()
    proto = get_protocol(protocol, cfg) if isinstance(protocol, str) else protocol
    st = stats if stats is not None else RolloutStats()
    tok = backend.tokenizer
    specials = added_tokens(tok)  # stripped from passages: every added token, not just the named ones
    t_start = time.perf_counter()
    tokens_before, retrieval_before = st.generated_tokens, st.retrieval_seconds

    rollouts: list[_Rollout] = []
    prompt_cache: dict[str, tuple[str, list[int]]] = {}
    for i, q in enumerate(questions):
        qid, text = _as_question(q, i)
        if text not in prompt_cache:
            prompt_cache[text] = proto.prompt_ids(tok, text)
        p_text, p_ids = prompt_cache[text]
        for s in range(n):
            traj = Trajectory(question_id=qid, question=text, protocol=proto.name, prompt_text=p_text,
                              prompt_ids=list(p_ids), sample_index=s, source=source)
            rollouts.append(_Rollout(traj, list(p_ids)))
    st.rollouts += len(rollouts)

    stops = proto.stops if cfg.stop_at_answer else [proto.query_close]
    log_every, last_log = 15.0, [time.perf_counter()]
    streaming = cfg.continuous_batching and callable(getattr(backend, "generate_stream", None))
    base_seed = None if seed is None else int(seed) * 1_000_003

    def budget(r: _Rollout) -> int:
        return min(cfg.max_segment_tokens, cfg.max_total_tokens - r.used)

    def advance(done: list[tuple[int, Any]]) -> list[tuple[int, list[int], int]]:
        """Take the generations of rollouts that stopped; one retrieval call for every query among them;
        insert the documents. Returns (key, next prompt, budget) of the rollouts that go on."""
        pending: list[tuple[_Rollout, str]] = []
        notices: list[_Rollout] = []
        for key, g in done:
            r = rollouts[key]
            r.traj.segments.append(Segment("model", g.text, list(g.token_ids), list(g.logprobs)))
            r.ids.extend(g.token_ids)
            r.used += len(g.token_ids)
            st.generated_tokens += len(g.token_ids)
            first = len(r.traj.segments) == 1
            act = proto.parse_segment(g.text, g.stop if g.finish == "stop" else None,
                                      lead=proto.assistant_prefix if first else "")
            if act.kind == "answer":
                _finish(proto, r, "answered")
            elif act.kind == "bad_query":
                _finish(proto, r, "malformed")
            elif act.kind == "search":
                if r.traj.retrievals >= cfg.max_retrievals:
                    _finish(proto, r, "max_retrievals")
                elif r.used >= cfg.max_total_tokens:
                    _finish(proto, r, "length")
                elif not act.query:
                    if proto.empty_query_fatal:
                        _finish(proto, r, "malformed")
                    else:
                        notices.append(r)
                else:
                    pending.append((r, act.query))
            elif g.finish == "length":
                _finish(proto, r, "length")
            else:  # EOS (or a stop string the protocol does not act on)
                _finish(proto, r, "answered" if proto.extract_answer(r.traj.model_text) is not None else "malformed")

        hits_by_query: dict[str, list] = {}
        if pending:
            uniq = list(dict.fromkeys(q for _, q in pending))
            t0 = time.perf_counter()
            results = retriever.search(uniq, cfg.top_k)
            st.retrieval_seconds += time.perf_counter() - t0
            st.retrieval_calls += 1
            st.queries += len(pending)
            st.unique_queries += len(uniq)
            if len(results) != len(uniq):
                raise RuntimeError(f"retriever returned {len(results)} result lists for {len(uniq)} queries")
            hits_by_query = dict(zip(uniq, results, strict=True))
        for r in notices:
            _insert(r, proto.empty_query_text(), "", [], tok, cfg, proto, st)
        for r, q in pending:
            hits = list(hits_by_query[q])[: cfg.top_k]
            _insert(r, proto.documents_text(hits, specials), q, [h.id for h in hits], tok, cfg, proto, st)
        st.rounds += 1
        now = time.perf_counter()
        if not streaming or now - last_log[0] >= log_every:  # progress: a rollout batch can take minutes on a CPU
            last_log[0] = now
            made = st.generated_tokens - tokens_before
            log.info("%d of %d rollouts finished, %d queries so far; %d model tokens in %.0fs (%.1f tok/s)",
                     sum(r.done for r in rollouts), len(rollouts), st.queries, made, now - t_start,
                     made / max(now - t_start, 1e-9))
        return [(key, rollouts[key].ids, budget(rollouts[key])) for key, _ in done if not rollouts[key].done]

    with _session(backend, [proto.query_close]):
        keys = list(range(len(rollouts)))
        t0 = time.perf_counter()
        if streaming:
            backend.generate_stream([rollouts[k].ids for k in keys], max_new_tokens=[budget(rollouts[k]) for k in keys],
                                    stop=stops, temperature=temperature, top_p=top_p, seed=base_seed,
                                    on_finish=advance)
        else:  # synchronous rounds: every unfinished rollout in one generate call per round
            rnd = 0
            while keys:
                gens = backend.generate([rollouts[k].ids for k in keys], max_new_tokens=[budget(rollouts[k]) for k in keys],
                                        stop=stops, temperature=temperature, top_p=top_p,
                                        seed=None if base_seed is None else base_seed + rnd)
                keys = [k for k, _, _ in advance(list(zip(keys, gens, strict=True)))]
                rnd += 1
        st.generate_seconds += time.perf_counter() - t0 - (st.retrieval_seconds - retrieval_before)

    st.wall_seconds += time.perf_counter() - t_start
    for r in rollouts:
        st.finish[r.traj.finish_reason] = st.finish.get(r.traj.finish_reason, 0) + 1
    log.info("rollouts: %d in %.1fs, %d rounds, %d model tokens (%.1f tok/s), retrieval %.2fs (%.1f%%) "
             "for %d queries, finish %s", len(rollouts), st.wall_seconds, st.rounds, st.generated_tokens,
             st.tokens_per_second, st.retrieval_seconds, 100 * st.retrieval_share, st.queries, st.finish)
    return [r.traj for r in rollouts]


def _insert(r: _Rollout, text: str, query: str, ids: list[str], tok, cfg, proto: Protocol, st: RolloutStats):
    env_ids = encode_untrusted(tok, text, allow=proto.tags)  # passages are sanitised already; belt and braces
    r.traj.retrievals += 1
    r.traj.queries.append(query)
    r.traj.retrieved_ids.append(ids)
    if r.used + len(env_ids) >= cfg.max_total_tokens:  # no room for the block plus one model token
        _finish(proto, r, "length")
        return
    r.traj.segments.append(Segment("env", text, env_ids, None))
    r.ids.extend(env_ids)
    r.used += len(env_ids)
    st.env_tokens += len(env_ids)


def _finish(proto: Protocol, r: _Rollout, reason: str) -> None:
    t = r.traj
    model_text = t.model_text
    t.answer = proto.extract_answer(model_text) if reason == "answered" else None
    if reason == "answered" and t.answer is None:
        reason = "malformed"
    t.finish_reason = reason  # type: ignore[assignment]
    t.internal_steps = proto.internal_steps(model_text)
    r.done = True


def _session(backend, continue_stops):
    """The backend's KV-reuse session for one run_rollouts (HFBackend), or a no-op."""
    session = getattr(backend, "session", None)
    return session(continue_stops=continue_stops) if callable(session) else contextlib.nullcontext()
