"""Rejection sampling for the SFT cold start (R1-Searcher++ stage 1, METHOD.md A.3) and R1-Searcher's
difficulty labels (METHOD.md B.3).

Samplers run in the order of `sample.sampler`; each draws trajectories through the one agent loop
(searchrl/agent/engine.py, real retrieval) for the questions still short of `keep_per_question`:

    policy   the base policy with the protocol's prompt, `n_samples` rollouts per question at
             `temperature` (the paper's method);
    teacher  another model with the same prompt (searchrl/training/teacher.py: a local / hub model,
             vLLM, or an OpenAI-compatible endpoint);
    oracle   the source's gold evidence, written out by a scripted backend (ScriptBackend in
             searchrl/training/teacher.py) through the same loop, so the retriever inserts the real
             documents; `oracle_variants` wordings of the queries per question. What it writes
             depends on the evidence the record carries (`oracle_kind`):
               hops      Knowledge World hop chains: an internal hop recalled in <internal>, an
                         external hop searched with a relation-worded query, the fact restated;
               evidence  real multi-hop QA with gold supporting paragraphs (HotpotQA / 2Wiki
                         `supporting_facts`, IRCoT `is_supporting`, MuSiQue `question_decomposition`;
                         searchrl/training/evidence.py): one query per supporting paragraph (MuSiQue:
                         the hop's sub-question with earlier answers put in; HotpotQA / 2Wiki: the
                         gold title and the question's keywords; the first wording whose real top-k
                         holds the gold paragraph), then one sentence of the retrieved gold passage
                         restating the fact (verbatim, never invented), then the gold answer.
             Records without either are skipped (counted as `no_evidence`); a source whose training
             files carry no evidence at all is a config error at start-up (searchrl/config.py).

Every candidate is judged by the same filters, each reported on its own:

    format     the protocol validator finds nothing wrong and the rollout ended with an answer
    answer     CEM against a gold answer and at most `max_answer_words` words (the RL answer reward)
    retrieval  every document block is exactly what the retriever returns for the block's query
               (text and passage ids), so no block was forged or edited
    self_docs  no document tag in the model's own text (no self-written documents)
    grounded   (oracle only) hops: each external hop's object is in the documents its query brought
               back; evidence: each query's document block holds its gold paragraph (title) and the
               sentence restated after the block is text of that block

Accepted candidates are ranked by retrieval count (fewest first: R1-Searcher++ prefers internal
knowledge), then by length; duplicates are dropped and up to `keep_per_question` are kept.

Difficulty (B.3 ranks questions by "the number of rollouts needed to answer correctly": easy < 10,
medium 10-20, difficult > 20; the counting procedure is not given). Here: the rate r of answer-correct
rollouts (the `answer` filter; format not required) among the first model sampler's (policy or
teacher) `n_samples` rollouts, read as 1 / (expected rollouts to a correct one):

    easy       r >= difficulty.easy_min_rate        (paper: 0.1, i.e. fewer than 10 rollouts)
    medium     r >= difficulty.medium_min_rate      (paper: 0.05, i.e. 10-20 rollouts)
    difficult  otherwise, including r = 0
    unknown    no model sampler ran on the question (oracle-only sampling)

The first model sampler in the list therefore samples every question it is given (at most
`model_max_questions` of them, a seeded subset), even those an earlier sampler already filled.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from searchrl.agent.backends import added_tokens
from searchrl.agent.protocols import Protocol, sanitize_passage
from searchrl.agent.trajectory import Trajectory
from searchrl.data.schema import QARecord
from searchrl.errors import ConfigError
from searchrl.rewards import is_correct
from searchrl.training.evidence import (
    evidence_steps,
    fact_sentence,
    has_evidence,
    title_matches,
    visible_text,
)

log = logging.getLogger(__name__)

FILTERS = ("format", "answer", "retrieval", "self_docs")
ORACLE_FILTERS = (*FILTERS, "grounded")
MIX = ("internal_only", "external_only", "mixed", "direct")
DIFFICULTIES = ("easy", "medium", "difficult", "unknown")
MODEL_SAMPLERS = ("policy", "teacher")


@dataclass
class Candidate:
    traj: Trajectory
    sampler: str
    checks: dict[str, bool]
    reasons: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return all(self.checks.values())


# ----------------------------------------------------------------------------- filters
def document_problems(trajs: Sequence[Trajectory], protocol: Protocol, retriever, top_k: int,
                      specials: Sequence[str] = ()) -> list[list[str]]:
    """Per trajectory, every document block that is not exactly the retriever's answer to its query.

    The i-th env segment must equal `protocol.documents_text(retriever.search([query_i], top_k))` and
    `retrieved_ids[i]` the ids of those hits. All queries are looked up in one batched call (the
    retrieval cache makes this a replay of the rollouts' own searches)."""
    queries = sorted({q for t in trajs for q in t.queries if q})
    hits = dict(zip(queries, retriever.search(queries, top_k), strict=True)) if queries else {}
    out = []
    for t in trajs:
        problems: list[str] = []
        blocks = [s for s in t.segments if s.role == "env"]
        if len(blocks) > len(t.queries) or len(t.retrieved_ids) != len(t.queries):
            problems.append(f"document count: {len(blocks)} blocks for {len(t.queries)} queries")
        for i, (seg, query) in enumerate(zip(blocks, t.queries, strict=False)):
            if not query:
                problems.append(f"document without retrieval: block {i + 1} answers an empty query")
                continue
            found = list(hits[query])[:top_k]
            if seg.text != protocol.documents_text(found, specials):
                problems.append(f"forged document: block {i + 1} differs from the retriever's passages for {query!r}")
            elif i < len(t.retrieved_ids) and list(t.retrieved_ids[i]) != [h.id for h in found]:
                problems.append(f"forged document: block {i + 1} passage ids differ from the retriever's for {query!r}")
        out.append(problems)
    return out


def self_written_documents(traj: Trajectory, protocol: Protocol) -> bool:
    tags = (protocol.doc_open, protocol.doc_close)
    return any(s.role == "model" and any(tag in s.text for tag in tags) for s in traj.segments)


def judge(trajs: Sequence[Trajectory], golds: dict[str, list[str]], protocol: Protocol, retriever, top_k: int,
          sampler: str, max_answer_words: int = 10, specials: Sequence[str] = ()) -> list[Candidate]:
    """Run every filter on every trajectory (each filter independently, so each one's pass rate is known)."""
    doc_problems = document_problems(trajs, protocol, retriever, top_k, specials)
    out = []
    for t, problems in zip(trajs, doc_problems, strict=True):
        violations = protocol.validate(t)
        if t.finish_reason != "answered":
            violations = [f"finish: {t.finish_reason}", *violations]
        checks = {
            "format": not violations,
            "answer": is_correct(t.answer, golds[t.question_id], max_answer_words),
            "retrieval": not problems,
            "self_docs": not self_written_documents(t, protocol),
        }
        reasons = violations + problems + ([] if checks["answer"] else [f"wrong answer: {t.answer!r}"])
        if not checks["self_docs"]:
            reasons.append("self-written document: a document tag in the model's text")
        out.append(Candidate(t, sampler, checks, reasons))
    return out


def knowledge_mix(traj: Trajectory) -> str:
    """internal_only / external_only / mixed / direct (neither recalled nor searched)."""
    if traj.retrievals and traj.internal_steps:
        return "mixed"
    if traj.retrievals:
        return "external_only"
    return "internal_only" if traj.internal_steps else "direct"


def select(accepted: Sequence[Candidate], keep: int, taken: Sequence[Candidate] = ()) -> list[Candidate]:
    """Up to `keep - len(taken)` more of one question's accepted candidates: fewest retrievals first,
    then shortest; a completion already taken (or seen) is skipped."""
    seen = {c.traj.completion_text for c in taken}
    out: list[Candidate] = []
    for c in sorted(accepted, key=lambda c: (c.traj.retrievals, c.traj.n_model_tokens, c.traj.sample_index)):
        if len(taken) + len(out) >= keep:
            break
        if c.traj.completion_text not in seen:
            seen.add(c.traj.completion_text)
            out.append(c)
    return out


def difficulty_label(n_correct: int, n: int, easy_min_rate: float, medium_min_rate: float) -> str:
    if n <= 0:
        return "unknown"
    rate = n_correct / n
    if rate >= easy_min_rate and rate > 0:
        return "easy"
    if rate >= medium_min_rate and rate > 0:
        return "medium"
    return "difficult"


# ----------------------------------------------------------------------------- oracle
QUERIES = {  # relation -> query wordings ({s} = subject)
    "born_in": ("{s} born in country", "where was {s} born"),
    "works_for": ("{s} works for company", "{s} employer"),
    "founded_in": ("{s} founded in year", "when was {s} founded"),
    "headquartered_in": ("{s} headquartered in country", "where is {s} headquartered"),
    "founded_by": ("{s} founded by", "who founded {s}"),
    "written_by": ("{s} written by", "who wrote {s}"),
    "published_in": ("{s} published in year", "when was {s} published"),
    "capital": ("capital of {s}", "{s} capital city"),
    "official_language": ("official language of {s}", "{s} official language"),
    "currency": ("currency of {s}", "{s} currency"),
    "continent": ("continent of {s}", "{s} located on continent"),
}


def oracle_query(hop: dict, variant: int) -> str:
    options = QUERIES.get(hop.get("relation", ""), ("{s} " + str(hop.get("relation", "")).replace("_", " "),))
    return options[variant % len(options)].format(s=hop.get("subject", "")).strip()


def oracle_segments(record: QARecord, protocol: Protocol, variant: int = 0) -> list[str]:
    """The oracle's model segments for one question: one per external hop (ending with the query
    close tag), then the last one ending with the answer close tag. Variant v picks query wording
    v (mod the wordings of each relation), rotated per hop so variants differ."""
    from searchrl.training.memorization import hop_statement

    hops = record.metadata.get("hops")
    if not hops:
        raise ConfigError(f"sample.sampler oracle: question {record.id} has no hop chain (metadata.hops); "
                          "records with gold evidence go to evidence_segments")
    internal = getattr(protocol, "internal_open", None), getattr(protocol, "internal_close", None)
    segments, text = [], ""
    for i, hop in enumerate(hops):
        fact = hop_statement(hop)
        if hop.get("source") == "internal":
            text += f"{internal[0]}{fact}{internal[1]}\n" if internal[0] else f"{fact}\n"
        else:
            text += f"{protocol.query_open}{oracle_query(hop, variant + i)}{protocol.query_close}"
            segments.append(text)
            text = f"{fact}\n"
    segments.append(text + answer_segment(record, protocol))
    return segments


def answer_segment(record: QARecord, protocol: Protocol) -> str:
    """The last segment's ending: the gold answer in the answer tags (R1-Searcher: after </think>).
    Tags in the data are removed, so a gold answer can never close or open one."""
    answer = f"{protocol.answer_open}{sanitize_passage(record.answers[0])}{protocol.answer_close}"
    return protocol.answer_lead + answer  # R1-Searcher: "</think>\n" (its prompt opens <think>)


def oracle_kind(record: QARecord) -> str | None:
    """Which oracle can write this record: "hops" (Knowledge World), "evidence" (gold supporting
    paragraphs, searchrl/training/evidence.py) or None."""
    if record.metadata.get("hops"):
        return "hops"
    return "evidence" if has_evidence(record.metadata) else None


@dataclass
class EvidencePlan:
    """The evidence oracle's script for one question: per supporting paragraph the query it writes
    and the sentence it restates after the documents."""

    queries: list[str]
    facts: list[str]


def plan_evidence(records: Sequence[QARecord], retriever, protocol: Protocol, top_k: int, variant: int = 0,
                  specials: Sequence[str] = ()) -> dict[str, EvidencePlan]:
    """Per question id: for each gold step (`evidence_steps`) the first query wording (rotated by
    `variant`) whose top-k holds the gold title, else the first wording; the restated fact is
    `fact_sentence` of the gold passage as the block shows it (of the top passage when the gold one
    is missing: the candidate then fails `grounded`). Every wording of every question is searched in
    one batched call, with the protocol's own query cleaning, so the engine's searches replay them."""
    steps = {r.id: evidence_steps(r.question, r.answers, r.metadata) for r in records}
    wordings = {r.id: [s.queries[variant % len(s.queries):] + s.queries[: variant % len(s.queries)]
                       for s in steps[r.id]] for r in records}
    sent = sorted({protocol.clean_query(w) for ws in wordings.values() for step in ws for w in step} - {""})
    hits = dict(zip(sent, retriever.search(sent, top_k), strict=True)) if sent else {}
    plans = {}
    for r in records:
        plan = EvidencePlan([], [])
        for step, options in zip(steps[r.id], wordings[r.id], strict=True):
            results = [(w, list(hits.get(protocol.clean_query(w), []))[:top_k]) for w in options]
            found = [(w, hs, next(h for h in hs if title_matches(h.title, step.title)))
                     for w, hs in results if any(title_matches(h.title, step.title) for h in hs)]
            query, docs, gold = found[0] if found else (*results[0], None)
            source = gold or (docs[0] if docs else None)
            text = visible_text(source.title, source.text, protocol.max_passage_words, specials) if source else ""
            plan.queries.append(query)
            plan.facts.append(fact_sentence(text, step.anchors, r.question, step.gold_sentences))
        plans[r.id] = plan
    return plans


def evidence_segments(record: QARecord, plan: EvidencePlan, protocol: Protocol) -> list[str]:
    """The evidence oracle's model segments: one per query (ending with the query close tag), each
    after the first opening with the previous block's restated fact, the last ending with the answer."""
    segments, text = [], ""
    for query, fact in zip(plan.queries, plan.facts, strict=True):
        segments.append(f"{text}{protocol.query_open}{query}{protocol.query_close}")
        text = f"{fact}\n" if fact else ""
    return [*segments, text + answer_segment(record, protocol)]


def gold_in_blocks(traj: Trajectory, record: QARecord, protocol: Protocol) -> list[bool]:
    """Per document block of an evidence record's trajectory (at most one per gold step, in order):
    the block lists a passage with the step's gold title, as `format_passage` prints it."""
    steps = evidence_steps(record.question, record.answers, record.metadata)
    blocks = [s.text.lower() for s in traj.segments if s.role == "env"]
    out = []
    for i, (step, block) in enumerate(zip(steps, blocks, strict=False)):
        title = sanitize_passage(step.title)
        n = len(traj.retrieved_ids[i]) if i < len(traj.retrieved_ids) else 0
        out.append(bool(title) and any(("\n" + protocol.format_passage(j, title, "")).lower() in block
                                       for j in range(1, n + 1)))
    return out


def restated_from_blocks(traj: Trajectory) -> bool:
    """Every document block is followed by a model segment whose first line (the restated fact) is
    non-empty text of that block."""
    segs = traj.segments
    for i, seg in enumerate(segs):
        if seg.role != "env":
            continue
        nxt = segs[i + 1].text if i + 1 < len(segs) and segs[i + 1].role == "model" else ""
        line = nxt.split("\n", 1)[0].strip()
        if not line or line not in seg.text:
            return False
    return True


def grounded(traj: Trajectory, record: QARecord, protocol: Protocol | None = None) -> bool:
    """hops: each external hop's object (any gold alias for the last hop) appears in its document
    block. evidence (needs `protocol`): one block per gold step, each holding its gold paragraph,
    and each restated fact taken from its block."""
    if oracle_kind(record) == "evidence":
        if protocol is None:
            raise ValueError("grounded: an evidence record needs the protocol")
        n_steps = len(evidence_steps(record.question, record.answers, record.metadata))
        found = gold_in_blocks(traj, record, protocol)
        n_blocks = sum(s.role == "env" for s in traj.segments)
        return n_steps > 0 and n_blocks == n_steps and all(found) and restated_from_blocks(traj)
    hops = [h for h in record.metadata.get("hops", []) if h.get("source") != "internal"]
    blocks = [s.text.lower() for s in traj.segments if s.role == "env"]
    if len(blocks) != len(hops):
        return False
    return all(str(h.get("object", "")).lower() in b for h, b in zip(hops, blocks, strict=True))


def oracle_rollouts(records: Sequence[QARecord], tokenizer, retriever, protocol: Protocol, agent_cfg,
                    variants: int, seed: int) -> list[Trajectory]:
    """`variants` oracle trajectories per question that has hops or gold evidence (`oracle_kind`),
    through the agent loop with real retrieval; the others are skipped (see `run_sampling`)."""
    from searchrl.agent.engine import run_rollouts
    from searchrl.training.teacher import ScriptBackend

    usable = [r for r in records if oracle_kind(r)]
    if not usable:
        raise ConfigError(f"sample.sampler oracle: none of the {len(records)} questions has gold evidence (Knowledge "
                          "World hop chains, or HotpotQA / 2Wiki / MuSiQue supporting facts); use policy or teacher")
    evidence = [r for r in usable if oracle_kind(r) == "evidence"]
    specials = added_tokens(tokenizer)
    out: list[Trajectory] = []
    for v in range(variants):
        plans = plan_evidence(evidence, retriever, protocol, agent_cfg.top_k, v, specials) if evidence else {}
        scripts = {r.question.strip(): (evidence_segments(r, plans[r.id], protocol) if r.id in plans
                                        else oracle_segments(r, protocol, v)) for r in usable}
        backend = ScriptBackend(tokenizer, scripts, allow=protocol.tags)
        trajs = run_rollouts(backend, retriever, protocol, usable, n=1,
                             temperature=0.0, agent_cfg=agent_cfg, seed=seed, source="oracle")
        for t in trajs:
            t.sample_index = v
        out.extend(trajs)
    return out


# ----------------------------------------------------------------------------- driver
@dataclass
class SamplingResult:
    kept: list[Candidate]
    difficulty: list[dict]  # one row per question: id, difficulty, n_samples, n_correct, correct_rate, sampler
    stats: dict


BackendFactory = Callable[[str], object]  # sampler name -> Backend (policy / teacher)


def run_sampling(records: Sequence[QARecord], samplers: Sequence[str], backend_for: BackendFactory, retriever,
                 protocol: Protocol, agent_cfg, *, n_samples: int, temperature: float, top_p: float = 1.0,
                 keep_per_question: int, max_answer_words: int = 10, oracle_variants: int = 1,
                 easy_min_rate: float = 0.5, medium_min_rate: float = 0.01, seed: int = 0,
                 model_max_questions: int = 0, oracle_tokenizer=None) -> SamplingResult:
    """Run the samplers in order (see the module docstring); `backend_for(name)` builds the policy or
    teacher backend when its turn comes; `oracle_tokenizer` is the student tokenizer the oracle writes with."""
    from searchrl.agent.engine import RolloutStats, run_rollouts

    golds = {r.id: list(r.answers) for r in records}
    by_id = {r.id: r for r in records}
    kept: dict[str, list[Candidate]] = {r.id: [] for r in records}
    difficulty_from = next((s for s in samplers if s in MODEL_SAMPLERS), None)
    model_ids = {r.id for r in random_subset(records, model_max_questions, seed)}
    correct: dict[str, tuple[int, int]] = {}
    stats: dict = {"questions": len(records), "samplers": {}}
    for name in samplers:
        todo = [r for r in records if name == difficulty_from or len(kept[r.id]) < keep_per_question]
        if name in MODEL_SAMPLERS:
            todo = [r for r in todo if r.id in model_ids]
        st: dict = {"questions": len(todo), "candidates": 0, "accepted": 0, "kept": 0}
        stats["samplers"][name] = st
        if not todo:
            continue
        t0 = time.perf_counter()
        if name == "oracle":
            if oracle_tokenizer is None:
                raise ConfigError("sample.sampler oracle: no tokenizer to write the oracle's text with")
            trajs = oracle_rollouts(todo, oracle_tokenizer, retriever, protocol, agent_cfg, oracle_variants, seed)
            specials = added_tokens(oracle_tokenizer)
            st["no_evidence"] = sum(oracle_kind(r) is None for r in todo)
            if st["no_evidence"]:
                log.warning("sample[oracle]: %d of %d questions carry no gold evidence (no hop chain, no supporting "
                            "facts); the oracle skips them", st["no_evidence"], len(todo))
        elif name in MODEL_SAMPLERS:
            backend = backend_for(name)
            specials = added_tokens(backend.tokenizer)
            rstats = RolloutStats()
            trajs = []
            step = max(1, (4 * agent_cfg.batch_size) // n_samples)  # questions per engine call
            for a in range(0, len(todo), step):
                part = todo[a: a + step]
                trajs.extend(run_rollouts(backend, retriever, protocol, part, n=n_samples, temperature=temperature,
                                          agent_cfg=agent_cfg, seed=seed + a, top_p=top_p, stats=rstats,
                                          source=name))
                done = min(a + step, len(todo))
                log.info("sample[%s]: %d/%d questions, %d rollouts, %.1f rollouts/min, %.1f tok/s", name, done,
                         len(todo), len(trajs), 60 * len(trajs) / max(time.perf_counter() - t0, 1e-9),
                         rstats.tokens_per_second)
            st["rollout"] = {k: v for k, v in rstats.to_dict().items() if isinstance(v, (int, float))}
        else:
            raise ConfigError(f"sample.sampler: unknown sampler '{name}' (policy | teacher | oracle)")
        cands = judge(trajs, golds, protocol, retriever, agent_cfg.top_k, name, max_answer_words, specials)
        if name == "oracle":
            found = []
            for c in cands:
                rec = by_id[c.traj.question_id]
                c.checks["grounded"] = grounded(c.traj, rec, protocol)
                if not c.checks["grounded"]:
                    c.reasons.append("ungrounded: a searched fact is not in the documents its query returned")
                if oracle_kind(rec) == "evidence":
                    found.extend(gold_in_blocks(c.traj, rec, protocol))
            if found:  # how often the real retriever brought the gold paragraph back (per inserted block)
                st["evidence"] = {"gold_blocks": len(found), "gold_retrieved": sum(found),
                                  "gold_recall": round(sum(found) / len(found), 4)}
        if name == difficulty_from:
            for r in todo:
                mine = [c for c in cands if c.traj.question_id == r.id]
                correct[r.id] = (sum(c.checks["answer"] for c in mine), len(mine))
        for qid in dict.fromkeys(c.traj.question_id for c in cands):
            mine = [c for c in cands if c.traj.question_id == qid and c.accepted]
            kept[qid].extend(select(mine, keep_per_question, kept[qid]))
        st.update(_sampler_stats(cands, kept, name))
        st["seconds"] = round(time.perf_counter() - t0, 2)
        log.info("sample[%s]: %d candidates, accepted %d (%.1f%%), kept %d; pass rates %s; %.1fs", name,
                 st["candidates"], st["accepted"], 100 * st["acceptance"], st["kept"],
                 {k: round(v, 3) for k, v in st["pass_rate"].items()}, st["seconds"])

    rows = []
    for r in records:
        n_ok, n = correct.get(r.id, (0, 0))
        rows.append({"id": r.id, "difficulty": difficulty_label(n_ok, n, easy_min_rate, medium_min_rate),
                     "n_samples": n, "n_correct": n_ok, "correct_rate": n_ok / n if n else 0.0,
                     "sampler": difficulty_from if n else ""})
    all_kept = [c for r in records for c in kept[r.id]]
    stats.update(_summary(all_kept, rows, len(records)))
    return SamplingResult(all_kept, rows, stats)


def _sampler_stats(cands: Sequence[Candidate], kept: dict[str, list[Candidate]], name: str) -> dict:
    n = len(cands)
    names = ORACLE_FILTERS if name == "oracle" else FILTERS
    accepted = sum(c.accepted for c in cands)
    finish = Counter(c.traj.finish_reason for c in cands)
    reasons = Counter(r.split(":")[0] for c in cands for r in c.reasons)
    return {
        "candidates": n, "accepted": accepted, "acceptance": accepted / n if n else 0.0,
        "kept": sum(c.sampler == name for cs in kept.values() for c in cs),
        "pass_rate": {f: (sum(c.checks[f] for c in cands) / n if n else 0.0) for f in names},
        "questions_with_accepted": len({c.traj.question_id for c in cands if c.accepted}),
        "finish": dict(finish), "top_rejections": dict(reasons.most_common(8)),
    }


def _summary(kept: Sequence[Candidate], difficulty_rows: Sequence[dict], n_questions: int) -> dict:
    mix = Counter(knowledge_mix(c.traj) for c in kept)
    n = len(kept)
    return {
        "kept": n,
        "questions_covered": len({c.traj.question_id for c in kept}),
        "coverage": len({c.traj.question_id for c in kept}) / n_questions if n_questions else 0.0,
        "kept_by_sampler": dict(Counter(c.sampler for c in kept)),
        "mix": {m: mix.get(m, 0) for m in MIX},
        "mix_share": {m: (mix.get(m, 0) / n if n else 0.0) for m in MIX},
        "retrievals_mean": sum(c.traj.retrievals for c in kept) / n if n else 0.0,
        "model_tokens_mean": sum(c.traj.n_model_tokens for c in kept) / n if n else 0.0,
        "difficulty": {d: sum(r["difficulty"] == d for r in difficulty_rows) for d in DIFFICULTIES},
    }


def jsonl_row(c: Candidate, tokenizer_hash: str) -> dict:
    """One line of trajectories.jsonl: Trajectory.to_dict() plus the sampler and, for token ids
    that are the student's own (policy samples), the student tokenizer's fingerprint."""
    return {**c.traj.to_dict(), "sampler": c.sampler,
            "tokenizer": tokenizer_hash if c.sampler == "policy" else ""}


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary (token -> id), so stored token ids are reused only with the same one."""
    from searchrl.io import stable_hash

    return stable_hash(sorted(tokenizer.get_vocab().items()))


def random_subset(records: Sequence[QARecord], n: int, seed: int) -> list[QARecord]:
    """`n` questions (all when n is 0 or larger than the pool), a seeded sample in the pool's order."""
    if not n or n >= len(records):
        return list(records)
    pick = set(random.Random(f"sample/{seed}/{len(records)}").sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i in pick]
