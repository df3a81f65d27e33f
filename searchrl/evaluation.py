"""Evaluation: run each method on the eval questions and score it with METHOD.md §C metrics.

Methods
- direct : closed-book generation (the "Directly Gen" baseline), 0 retrievals.
- rag    : standard RAG, the question is retrieved once and the top-k passages go into the prompt.
- agent_r1searcher_pp / agent_r1searcher : the base policy prompted with a search protocol, run in
           the multi-turn agent loop (greedy), retrieval count and internal steps counted per question.
- sft / rl / rl_<ablation> : the trained policies (models/sft, models/rl, models/rl_<ablation>), each in
           the agent loop of the protocol it was trained with (tasks/evaluate.py `trained_model`); each
           also answers the seen-facts split closed-book (`<method>_closed_book`), as does `direct`
           (the base policy): memorization before and after RL.

Every method yields one prediction row per question; rows are scored per dataset into
`{dataset: {method: {em, f1, cem, n, retrievals, ...}}}`. On the Knowledge World (records carry hop
chains with a per-hop knowledge source) the adaptive metrics are added:
over-search rate, under-search rate and retrieval count minus the optimal count (`adaptive_metrics`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from searchrl.agent.backends import clean_short_answer
from searchrl.data.schema import QARecord
from searchrl.metrics import aggregate, score

log = logging.getLogger(__name__)

RAG_SYSTEM = ("Answer the question using the passages below and your own knowledge. "
              "Reply with only the short answer (a few words), no explanation.")


@dataclass
class Prediction:
    id: str
    dataset: str
    method: str
    question: str
    prediction: str
    golds: list[str]
    retrievals: int = 0
    internal_steps: int = 0
    finish_reason: str = "answered"
    format_valid: bool | None = None  # agent methods: answered and the protocol validator found nothing wrong
    retrieved_ids: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"id": self.id, "dataset": self.dataset, "method": self.method, "question": self.question,
                "prediction": self.prediction, "golds": list(self.golds), "retrievals": self.retrievals,
                "internal_steps": self.internal_steps, "finish_reason": self.finish_reason,
                "format_valid": self.format_valid, **self.scores}


def is_trained(method: str) -> bool:
    """Methods that evaluate a trained model (models/sft, models/rl, models/rl_<ablation>)."""
    return method == "sft" or method == "rl" or method.startswith("rl_")


def format_passages(hits, max_words: int = 120, extra_tokens=()) -> str:
    """The RAG prompt's passages, one a line, each shown as the agent sees it (`passage_view`:
    sanitised, at most `max_words` words of title and text)."""
    from searchrl.agent.protocols import passage_view

    lines = []
    for i, h in enumerate(hits, start=1):
        title, text = passage_view(h.title, h.text, max_words, extra_tokens)
        lines.append(f"({i}) {title}: {text}" if title else f"({i}) {text}")
    return "\n".join(lines)


def rag_prompts(tokenizer, questions: list[str], hits_per_question, max_words: int = 120) -> list[list[int]]:
    from searchrl.agent.backends import added_tokens, chat_prompt_ids

    specials = added_tokens(tokenizer)
    return [chat_prompt_ids(tokenizer, RAG_SYSTEM,
                            f"Passages:\n{format_passages(hits, max_words, specials)}\n\nQuestion: {q}")
            for q, hits in zip(questions, hits_per_question, strict=True)]


def predict_direct(backend, records: list[QARecord], max_new_tokens: int, batch_size: int) -> list[Prediction]:
    from searchrl.agent.backends import answer_closed_book

    answers = answer_closed_book(backend, [r.question for r in records], max_new_tokens, batch_size)
    return [make_prediction(r, "direct", clean_short_answer(a)) for r, a in zip(records, answers, strict=True)]


def predict_rag(backend, retriever, records: list[QARecord], top_k: int, max_new_tokens: int,
                max_passage_words: int = 120) -> list[Prediction]:
    hits = retriever.search([r.question for r in records], top_k)
    prompts = rag_prompts(backend.tokenizer, [r.question for r in records], hits, max_passage_words)
    gens = backend.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return [make_prediction(r, "rag", clean_short_answer(g.text), retrievals=1, retrieved_ids=[h.id for h in hs])
            for r, g, hs in zip(records, gens, hits, strict=True)]


def predict_agent(backend, retriever, records: list[QARecord], protocol_name: str, agent_cfg, method: str,
                  seed: int = 0) -> list[Prediction]:
    from searchrl.agent.engine import run_rollouts
    from searchrl.agent.protocols import get_protocol

    protocol = get_protocol(protocol_name, agent_cfg)
    trajs = run_rollouts(backend, retriever, protocol, records, n=1, temperature=0.0, agent_cfg=agent_cfg, seed=seed)
    by_id = {t.question_id: t for t in trajs}
    # the raw <answer> text, surrounding spaces kept: R1-Searcher's pred_ans (METHOD.md B.8, C)
    return [make_prediction(r, method, t.answer if t.answer is not None else "", retrievals=t.retrievals,
                        internal_steps=t.internal_steps, finish_reason=t.finish_reason,
                        format_valid=t.finish_reason == "answered" and not protocol.validate(t),
                        retrieved_ids=[pid for ids in t.retrieved_ids for pid in ids])
            for r in records for t in [by_id[r.id]]]


def make_prediction(record: QARecord, method: str, text: str, **kw) -> Prediction:
    """A scored prediction row: `text` is scored exactly as given (METHOD.md C: for the agents the raw
    <answer> text, surrounding spaces kept, so "True" / "False" map to yes / no only when exact)."""
    pred = Prediction(id=record.id, dataset=record.dataset, method=method, question=record.question,
                      prediction=text, golds=record.answers, metadata=record.metadata, **kw)
    pred.scores = score(text, record.answers)
    return pred


def adaptive_metrics(preds: list[Prediction]) -> dict[str, float]:
    """Over-/under-search on records with Knowledge World hop chains (empty dict otherwise).

    A hop is internal when the closed-book probe showed the base model knows it, external when the
    fact is only in the corpus; each hop names its gold passage.
    - over_search : the agent retrieved the gold passage of an internal hop (searched a known fact);
    - under_search: some external hop's gold passage was never retrieved, yet the agent answered;
    - excess_retrievals: mean(retrieval count - optimal retrieval count), optimal = external hops.
    """
    rows = [p for p in preds if "optimal_retrievals" in p.metadata and "hops" in p.metadata]
    if not rows:
        return {}
    over = under = 0
    excess = 0.0
    for p in rows:
        seen = set(p.retrieved_ids)
        hops = p.metadata["hops"]
        over += any(h.get("source") == "internal" and h.get("passage_id") in seen for h in hops)
        under += p.finish_reason == "answered" and any(
            h.get("source") == "external" and h.get("passage_id") not in seen for h in hops)
        excess += p.retrievals - int(p.metadata["optimal_retrievals"])
    n = len(rows)
    return {"over_search": 100.0 * over / n, "under_search": 100.0 * under / n,
            "excess_retrievals": excess / n,
            "optimal_retrievals": sum(int(p.metadata["optimal_retrievals"]) for p in rows) / n}


def summarize(preds: list[Prediction]) -> dict[str, dict[str, dict]]:
    """{dataset: {method: metrics}} plus an 'all' dataset when there are several."""
    groups: dict[tuple[str, str], list[Prediction]] = defaultdict(list)
    for p in preds:
        groups[(p.dataset, p.method)].append(p)
        groups[("all", p.method)].append(p)
    datasets = {p.dataset for p in preds}
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (dataset, method), rows in sorted(groups.items()):
        if dataset == "all" and len(datasets) < 2:
            continue
        m = aggregate([r.scores for r in rows])
        m["retrievals"] = sum(r.retrievals for r in rows) / len(rows)
        m["internal_steps"] = sum(r.internal_steps for r in rows) / len(rows)
        m["answered"] = 100.0 * sum(r.finish_reason == "answered" for r in rows) / len(rows)
        if any(r.format_valid is not None for r in rows):
            m["format_valid"] = 100.0 * sum(bool(r.format_valid) for r in rows) / len(rows)
        m.update(adaptive_metrics(rows))
        out[dataset][method] = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
    return dict(out)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def markdown_table(metrics: dict[str, dict[str, dict]]) -> str:
    """The evaluation table people look at (Prefect artifact, README)."""
    cols = ["em", "f1", "cem", "format_valid", "retrievals", "internal_steps", "over_search", "under_search"]
    lines = ["| dataset | method | n | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for dataset, methods in metrics.items():
        for method, m in methods.items():
            vals = [f"{m[c]:.1f}" if c in ("em", "f1", "cem", "format_valid", "over_search", "under_search") and c in m
                    else (f"{m[c]:.2f}" if c in m else "–") for c in cols]
            lines.append(f"| {dataset} | {method} | {m.get('n', 0)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
