"""Evaluation: run each method on the eval questions and score it with METHOD.md §C metrics.

Methods
- direct : closed-book generation (the "Directly Gen" baseline), 0 retrievals.
- rag    : standard RAG, the question is retrieved once and the top-k passages go into the prompt.
- agent_<protocol> (r1searcher_pp, r1searcher, search_r1, tool_call): the base policy prompted with that
           search protocol (searchrl/agent/protocols), run in
           the multi-turn agent loop (greedy), retrieval count and internal steps counted per question.
- sft / rl / rl_<ablation> : the trained policies (models/sft, models/rl, models/rl_<ablation>), each in
           the agent loop of the protocol it was trained with (tasks/evaluate.py `trained_model`); each
           also answers the seen-facts split closed-book (`<method>_closed_book`), as does `direct`
           (the base policy): memorization before and after RL.

Every method yields `samples` prediction rows per question and seed (one, greedy, by default), each
with its trajectory (`segments`: the model's text and the inserted documents, `queries`) for the
trajectory viewer; rows are scored per dataset into `{dataset: {method: {em, f1, cem, lasj, n,
retrievals, ...}}}`: each metric the mean over questions (a question's samples averaged first) with
its 95% bootstrap interval as `<metric>_lo` / `<metric>_hi` (searchrl/intervals.py); `lasj` (LLM
judge, searchrl/judge.py) when the rows were judged, with `lasj_unparseable` (replies neither True nor
False). `paired_comparisons` gives per-question differences between two methods with their interval.
On the Knowledge World (records carry hop chains with a per-hop knowledge source) the adaptive
metrics are added: over-search rate, under-search rate and retrieval count minus the optimal count
(`adaptive_metrics`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from searchrl.agent.backends import clean_short_answer
from searchrl.data.schema import QARecord
from searchrl.intervals import bootstrap_mean, paired_difference, per_question_mean
from searchrl.metrics import score

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
    sample: int = 0  # 0..samples*len(seeds)-1 for this (question, method)
    seed: int | None = None
    segments: list[list[str]] = field(default_factory=list)  # [[role ("model" | "env"), text], ...]
    queries: list[str] = field(default_factory=list)
    judge: str | None = None  # "True" | "False" | "unparseable" once judged
    judge_reply: str | None = None  # the judge's raw reply

    def row(self) -> dict:
        return {"id": self.id, "dataset": self.dataset, "method": self.method, "sample": self.sample,
                "seed": self.seed, "question": self.question, "prediction": self.prediction,
                "golds": list(self.golds), "retrievals": self.retrievals, "internal_steps": self.internal_steps,
                "finish_reason": self.finish_reason, "format_valid": self.format_valid, **self.scores,
                "judge": self.judge, "judge_reply": self.judge_reply, "queries": list(self.queries), "retrieved_ids": list(self.retrieved_ids),
                "segments": [list(seg) for seg in self.segments]}


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


def predict_direct(backend, records: list[QARecord], max_new_tokens: int, batch_size: int, n: int = 1,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Prediction]:
    """Closed-book answers: `n` per question (question-major, `sample` 0..n-1); greedy at temperature 0."""
    from searchrl.agent.backends import answer_closed_book

    rows = [(r, s) for r in records for s in range(n)]
    answers = answer_closed_book(backend, [r.question for r, _ in rows], max_new_tokens, batch_size,
                                 temperature=temperature, top_p=top_p, seed=seed, raw=True)
    return [make_prediction(r, "direct", clean_short_answer(a), sample=s, seed=seed, segments=[["model", a]])
            for (r, s), a in zip(rows, answers, strict=True)]


def predict_rag(backend, retriever, records: list[QARecord], top_k: int, max_new_tokens: int,
                max_passage_words: int = 120, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                seed: int | None = None) -> list[Prediction]:
    """Standard RAG: the question retrieved once, `n` answers per question (question-major)."""
    from searchrl.agent.backends import added_tokens

    hits = retriever.search([r.question for r in records], top_k)
    prompts = rag_prompts(backend.tokenizer, [r.question for r in records], hits, max_passage_words)
    shown = [format_passages(hs, max_passage_words, added_tokens(backend.tokenizer)) for hs in hits]
    gens = backend.generate([p for p in prompts for _ in range(n)], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed)
    return [make_prediction(r, "rag", clean_short_answer(gens[i * n + s].text), retrievals=1,
                            retrieved_ids=[h.id for h in hs], sample=s, seed=seed, queries=[r.question],
                            segments=[["env", f"Passages:\n{text}\n"], ["model", gens[i * n + s].text]])
            for i, (r, hs, text) in enumerate(zip(records, hits, shown, strict=True)) for s in range(n)]


def predict_agent(backend, retriever, records: list[QARecord], protocol_name: str, agent_cfg, method: str,
                  seed: int = 0, n: int = 1, temperature: float = 0.0, top_p: float = 1.0) -> list[Prediction]:
    """The agent loop of `protocol_name`: `n` rollouts per question (question-major, greedy at 0)."""
    from searchrl.agent.engine import run_rollouts
    from searchrl.agent.protocols import get_protocol

    protocol = get_protocol(protocol_name, agent_cfg)
    trajs = run_rollouts(backend, retriever, protocol, records, n=n, temperature=temperature, top_p=top_p,
                         agent_cfg=agent_cfg, seed=seed)
    by_key = {(t.question_id, t.sample_index): t for t in trajs}
    # the raw <answer> text, surrounding spaces kept: R1-Searcher's pred_ans (METHOD.md B.8, C)
    return [make_prediction(r, method, t.answer if t.answer is not None else "", retrievals=t.retrievals,
                            internal_steps=t.internal_steps, finish_reason=t.finish_reason,
                            format_valid=t.finish_reason == "answered" and not protocol.validate(t),
                            retrieved_ids=[pid for ids in t.retrieved_ids for pid in ids], sample=s, seed=seed,
                            queries=list(t.queries), segments=[[seg.role, seg.text] for seg in t.segments])
            for r in records for s in range(n) for t in [by_key[(r.id, s)]]]


OUT_OF_TOKENS_WARN = 0.25  # a share of agent rollouts ended on the token budget that makes scores the budget's


def budget_warning(preds: list[Prediction], method: str, max_total_tokens: int, top_k: int,
                   train_top_k: int) -> str | None:
    """One line when more than OUT_OF_TOKENS_WARN of an agent method's rollouts ran out of
    agent.max_total_tokens (finish_reason "length"): its scores then measure the budget, e.g. when
    evaluate.top_k inserts more passages per retrieval than training (agent.top_k) sized the budget for.
    None otherwise (and for methods without rollouts)."""
    cut = sum(p.finish_reason == "length" for p in preds)
    if not preds or cut <= OUT_OF_TOKENS_WARN * len(preds):
        return None
    hint = (f"evaluate.top_k {top_k} inserts more passages per retrieval than training's agent.top_k "
            f"{train_top_k}; set evaluate.top_k={train_top_k} or raise agent.max_total_tokens"
            if top_k > train_top_k else "raise agent.max_total_tokens")
    return (f"evaluate: {method}: {cut} of {len(preds)} rollouts ran out of agent.max_total_tokens "
            f"({max_total_tokens}), so its scores are cut by the budget: {hint}")


def apply_judge(judge, preds: list[Prediction]) -> None:
    """Judge every prediction (searchrl/judge.py) in place: `scores["lasj"]` 1.0 / 0.0, `judge` the
    verdict ("True" / "False" / "unparseable"), `judge_reply` the raw reply."""
    verdicts = judge.judge([(p.question, p.golds, p.prediction) for p in preds])
    for p, v in zip(preds, verdicts, strict=True):
        p.scores["lasj"] = v.lasj
        p.judge = "unparseable" if v.verdict is None else str(v.verdict)
        p.judge_reply = v.reply


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


SCORE_KEYS = ("em", "f1", "cem", "lasj")  # per-row scores in [0, 1], reported x100
COMPARE_KEYS = ("f1", "lasj", "cem", "em", "retrievals")


def row_values(p: Prediction) -> dict[str, float]:
    """The per-row quantities that are averaged: scores x100, retrievals, internal steps, answered and
    (agent methods) format-valid and out-of-tokens (the rollout hit agent.max_total_tokens) as percentages."""
    vals = {k: 100.0 * float(p.scores[k]) for k in SCORE_KEYS if k in p.scores}
    vals.update(retrievals=float(p.retrievals), internal_steps=float(p.internal_steps),
                answered=100.0 * (p.finish_reason == "answered"))
    if p.format_valid is not None:
        vals["format_valid"] = 100.0 * bool(p.format_valid)
        vals["out_of_tokens"] = 100.0 * (p.finish_reason == "length")
    return vals


def question_values(rows: list[Prediction]) -> dict[str, dict[str, float]]:
    """{quantity: {question id: mean over that question's samples}}; a quantity only when every row has it."""
    per_row = [row_values(r) for r in rows]
    keys = [k for k in per_row[0] if all(k in v for v in per_row)] if per_row else []
    if any(r.format_valid is not None for r in rows) and "format_valid" not in keys:
        keys.append("format_valid")  # rows without a validator count as not valid, as before
        per_row = [{**v, "format_valid": v.get("format_valid", 0.0)} for v in per_row]
    return {k: per_question_mean([(r.id, v[k]) for r, v in zip(rows, per_row, strict=True)]) for k in keys}


def summarize(preds: list[Prediction], resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, dict]]:
    """{dataset: {method: metrics}} plus an 'all' dataset when there are several. Each quantity is the
    mean over questions with `<key>_lo` / `<key>_hi`, its 95% bootstrap interval (`resamples` > 0);
    `n` questions, `samples` rows per question; `lasj_unparseable` rows whose judge reply was neither
    True nor False."""
    groups: dict[tuple[str, str], list[Prediction]] = defaultdict(list)
    for p in preds:
        groups[(p.dataset, p.method)].append(p)
        groups[("all", p.method)].append(p)
    datasets = {p.dataset for p in preds}
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (dataset, method), rows in sorted(groups.items()):
        if dataset == "all" and len(datasets) < 2:
            continue
        m: dict = {}
        for key, by_question in question_values(rows).items():
            mean, lo, hi = bootstrap_mean(list(by_question.values()), resamples, seed)
            m[key] = mean
            if lo is not None:
                m[f"{key}_lo"], m[f"{key}_hi"] = lo, hi
        n = len({r.id for r in rows})
        m["n"], m["samples"] = n, round(len(rows) / n, 4) if n else 0
        if "lasj" in m:
            m["lasj_unparseable"] = sum(r.judge == "unparseable" for r in rows)
        m.update(adaptive_metrics(rows))
        out[dataset][method] = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
    return dict(out)


def paired_comparisons(preds: list[Prediction], pairs: list[tuple[str, str]], resamples: int = 1000,
                       seed: int = 0) -> dict[str, dict[str, dict]]:
    """{dataset: {"a - b": {key: diff, key_lo, key_hi, n}}} for each pair (a, b) of methods that both
    have rows in the dataset: per question a - b (each side's samples averaged first) over the
    questions both answered, with its 95% bootstrap interval. Keys: COMPARE_KEYS that both have."""
    by: dict[tuple[str, str], list[Prediction]] = defaultdict(list)
    for p in preds:
        by[(p.dataset, p.method)].append(p)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for dataset in sorted({d for d, _ in by}):
        for a, b in pairs:
            if (dataset, a) not in by or (dataset, b) not in by:
                continue
            qa, qb = question_values(by[(dataset, a)]), question_values(by[(dataset, b)])
            entry: dict = {}
            for key in COMPARE_KEYS:
                if key in qa and key in qb:
                    d = paired_difference(qa[key], qb[key], resamples, seed)
                    entry[key], entry["n"] = round(d["diff"], 4), d["n"]
                    if d["lo"] is not None:
                        entry[f"{key}_lo"], entry[f"{key}_hi"] = round(d["lo"], 4), round(d["hi"], 4)
            out[dataset][f"{a} - {b}"] = entry
    return dict(out)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def markdown_table(metrics: dict[str, dict[str, dict]]) -> str:
    """The evaluation table people look at (Prefect artifact, README): one row per dataset and method;
    a cell with an interval reads `mean [lo, hi]`."""
    cols = ["em", "f1", "cem", "lasj", "format_valid", "out_of_tokens", "retrievals", "internal_steps", "over_search",
            "under_search"]
    percent = ("em", "f1", "cem", "lasj", "format_valid", "out_of_tokens", "over_search", "under_search")

    def cell(m: dict, c: str) -> str:
        if c not in m:
            return "–"
        fmt = "{:.1f}" if c in percent else "{:.2f}"
        text = fmt.format(m[c])
        if f"{c}_lo" in m and c in ("em", "f1", "cem", "lasj", "retrievals"):
            text += f" [{fmt.format(m[f'{c}_lo'])}, {fmt.format(m[f'{c}_hi'])}]"
        return text

    lines = ["| dataset | method | n | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for dataset, methods in metrics.items():
        for method, m in methods.items():
            lines.append(f"| {dataset} | {method} | {m.get('n', 0)} | " + " | ".join(cell(m, c) for c in cols) + " |")
    return "\n".join(lines)
