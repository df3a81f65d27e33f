"""External-knowledge memorization (R1-Searcher++, METHOD.md A.6).

Each RL step, the correct rollouts that used retrieval (R_answer = 1 and at least one <external>
call) go to a rewriter that turns "question + the facts retrieved" into an internal-only reasoning
path: every fact as <internal>...</internal>, then <answer>...</answer>, no <external>, no
<document>. A rewrite is kept only if the protocol validator accepts it, it makes no retrieval call
and its answer is still correct (CEM, <= 10 words). The kept rewrites form the step's memorization
set T, and the policy is trained on them with

    L_M = - (1 / sum_{(x,y) in T} |y|) * sum_{(x,y) in T} sum_t log pi(y_t | x, y_<t)

(x = the protocol's RL prompt for the question, y = the rewrite), added to the RL loss as mu * L_M
(mu = 0.1). One rewrite per question and step (several correct rollouts of one question would
otherwise weight it several times); which of them is rewritten: the one with the fewest retrievals.

Rewriters (`rl.rewriter`):
    oracle   the source's gold evidence, no model. Knowledge World: each hop of the question's hop
             chain (metadata["hops"]) written as a plain statement. Real multi-hop QA with gold
             supporting paragraphs (HotpotQA / 2Wiki supporting facts, IRCoT is_supporting, MuSiQue
             decompositions; searchrl/training/evidence.py): for each gold paragraph the rollout
             actually retrieved (by title, in the evidence's reading order), the sentence of it that
             states the fact (`evidence.fact_sentence`, verbatim from the passage as the rollout saw
             it). Either way the answer is the rollout's own (correct) answer; a rollout that
             retrieved no gold paragraph, or a record without evidence, gets no rewrite. Which
             sources carry evidence is checked at start-up (searchrl/config.py).
    policy   the live policy, prompted (REWRITE_SYSTEM) with the question and the retrieved passages,
             greedy. Small policies rarely produce an accepted rewrite; the set size shows it.
    teacher  the same prompt sent to the teacher model (a local dir / hub id, or an OpenAI-compatible
             endpoint; see searchrl.training.teacher).
The paper's rewriter is a separately trained model whose prompt is not public ([gap]); these are the
closest reproducible stand-ins.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from searchrl.agent.backends import chat_prompt_ids, encode_untrusted
from searchrl.agent.protocols import Protocol, sanitize_passage
from searchrl.agent.trajectory import Trajectory
from searchrl.errors import ConfigError
from searchrl.rewards import is_correct
from searchrl.training.evidence import evidence_steps, fact_sentence, has_evidence

log = logging.getLogger(__name__)

# Knowledge World relations as statements ({s} subject, {o} object); others fall back to "s relation o".
STATEMENTS = {
    "born_in": "{s} was born in {o}.",
    "works_for": "{s} works for {o}.",
    "founded_in": "{s} was founded in {o}.",
    "headquartered_in": "{s} is headquartered in {o}.",
    "founded_by": "{s} was founded by {o}.",
    "written_by": "{s} was written by {o}.",
    "published_in": "{s} was first published in {o}.",
    "capital": "The capital of {s} is {o}.",
    "official_language": "The official language of {s} is {o}.",
    "currency": "The currency of {s} is the {o}.",
    "continent": "{s} is located in {o}.",
}

REWRITE_SYSTEM = """You turn a search-based solution into one that recalls every fact from memory.
You get a question and the information found by searching. Write the reasoning as short steps: state each fact you need inside <internal> and </internal>, for example <internal>Titanic came out in 1997.</internal>
Then give the final answer inside <answer> and </answer>: a name, a date, a number or a few words.
Never write <external> or <document>: everything is recalled, nothing is searched."""


@dataclass
class RewriteItem:
    """What a rewriter sees for one correct retrieval rollout."""

    question_id: str
    question: str
    answer: str
    info: list[str]  # the retrieved passages, as the rollout saw them
    metadata: dict = field(default_factory=dict)


@dataclass
class MemoryExample:
    question_id: str
    text: str  # the rewrite (completion)
    prompt_ids: list[int]
    completion_ids: list[int]


Rewriter = Callable[[list[RewriteItem]], list[str | None]]


# ----------------------------------------------------------------------------- rewriters
def hop_statement(hop: dict) -> str:
    template = STATEMENTS.get(hop.get("relation", ""))
    s, o = str(hop.get("subject", "")).strip(), str(hop.get("object", "")).strip()
    if template is None:
        return f"{s} {str(hop.get('relation', '')).replace('_', ' ')} {o}.".strip()
    text = template.format(s=s, o=o)
    return text[:1].upper() + text[1:]


def retrieved_gold_facts(item: RewriteItem) -> list[str]:
    """For each gold step of an evidence record, in order: the fact sentence of the first passage the
    rollout retrieved with the step's gold title (`item.info` lines are "Title: text"); steps whose
    paragraph was not retrieved are left out, repeated sentences once."""
    facts: list[str] = []
    for step in evidence_steps(item.question, [item.answer.strip()], item.metadata):
        title = sanitize_passage(step.title)
        prefix = f"{title}: ".lower()
        body = next((p[len(prefix):] for p in item.info if title and p.lower().startswith(prefix)), None)
        if body is None:
            continue
        body = body[: -len(" ...")] if body.endswith(" ...") else body  # the block's cut marker
        fact = fact_sentence(body, step.anchors, item.question, step.gold_sentences)
        if fact and fact not in facts:
            facts.append(fact)
    return facts


def oracle_rewrite(item: RewriteItem) -> str | None:
    """Knowledge World hops as statements, or the retrieved gold facts of an evidence record, each in
    <internal>, then the rollout's answer; None when the record has neither or nothing gold was retrieved."""
    hops = item.metadata.get("hops") or []
    if hops:
        facts = [hop_statement(h) for h in hops]
    elif has_evidence(item.metadata):
        facts = retrieved_gold_facts(item)
    else:
        facts = []
    if not facts:
        return None
    steps = "\n".join(f"<internal>{f}</internal>" for f in facts)
    return f"{steps}\n<answer>{item.answer}</answer>"


def oracle_rewriter(items: list[RewriteItem]) -> list[str | None]:
    return [oracle_rewrite(it) for it in items]


def rewrite_user_message(item: RewriteItem) -> str:
    info = "\n".join(f"({i}) {p}" for i, p in enumerate(item.info, 1)) or "None"
    return f"Question: {item.question}\nInfo:\n{info}"


def model_rewriter(backend, max_new_tokens: int = 160) -> Rewriter:
    """Rewriter over any searchrl Backend (the live policy, or a teacher): greedy, stops at </answer>."""

    def rewrite(items: list[RewriteItem]) -> list[str | None]:
        if not items:
            return []
        tok = backend.tokenizer
        prompts = [chat_prompt_ids(tok, REWRITE_SYSTEM, rewrite_user_message(it)) for it in items]
        gens = backend.generate(prompts, max_new_tokens=max_new_tokens, stop=["</answer>"], temperature=0.0)
        return [g.text.strip() or None for g in gens]

    return rewrite


def make_rewriter(kind: str, policy_backend=None, teacher_backend=None, max_new_tokens: int = 160
                  ) -> Rewriter:
    if kind == "oracle":
        return oracle_rewriter
    if kind == "policy":
        return model_rewriter(policy_backend, max_new_tokens)
    if kind == "teacher":
        if teacher_backend is None:
            raise ConfigError("rl.rewriter=teacher needs rl.teacher_model (a local dir, hub id or "
                              "http(s)://.../v1 endpoint)")
        return model_rewriter(teacher_backend, max_new_tokens)
    raise ConfigError(f"rl.rewriter: unknown rewriter '{kind}' (oracle | policy | teacher)")


def empty_set_warning(set_sizes: Sequence[float], candidates: Sequence[float], window: int,
                      rewriter: str) -> str | None:
    """The warning to log when memorization is on but its set T was empty in each of the last `window`
    steps (`set_sizes` / `candidates`: the per-step `memorization/size` and `memorization/candidates`,
    oldest first); None otherwise, or before `window` steps. The message says which side is empty:
    no correct rollout that searched (nothing to rewrite), or the rewriter's output all rejected."""
    if window < 1 or len(set_sizes) < window or any(n > 0 for n in set_sizes[-window:]):
        return None
    offered = int(sum(candidates[-window:]))
    why = (f"the rewriter was offered {offered} correct searched rollouts and none of its rewrites was accepted"
           if offered else "no rollout was both correct and searched, so there was nothing to rewrite")
    return (f"memorization is on (rl.rewriter: {rewriter}, mu > 0) but its set has been empty for {window} steps: "
            f"{why}; the memorization loss is doing nothing")


# ----------------------------------------------------------------------------- selection and filtering
_DOC_FRAME = re.compile(r"^\s*\(\d+\)\s*")


def retrieved_info(traj: Trajectory) -> list[str]:
    """The passages the rollout received, one string each, without the protocol's frame."""
    out: list[str] = []
    for seg in traj.segments:
        if seg.role != "env":
            continue
        for line in seg.text.splitlines():
            line = line.strip()
            if line.startswith("(") and _DOC_FRAME.match(line):
                out.append(_DOC_FRAME.sub("", line))
    return out


def select_for_rewrite(trajs: Sequence[Trajectory], correct: Sequence[bool],
                       metadata: dict[str, dict]) -> list[RewriteItem]:
    """One item per question: its correct rollout with retrievals >= 1 and the fewest retrievals."""
    best: dict[str, Trajectory] = {}
    for t, ok in zip(trajs, correct, strict=True):
        if ok and t.retrievals >= 1 and t.answer is not None:
            if t.question_id not in best or t.retrievals < best[t.question_id].retrievals:
                best[t.question_id] = t
    return [RewriteItem(t.question_id, t.question, t.answer or "", retrieved_info(t),
                        metadata.get(t.question_id, {})) for t in best.values()]


def accept_rewrite(text: str | None, golds: Sequence[str], protocol: Protocol, max_words: int = 10) -> bool:
    """Well formed under the protocol, no retrieval call, and a still-correct answer."""
    if not text:
        return False
    if protocol.query_open in text or protocol.query_close in text:
        return False
    if protocol.validate(text):
        return False
    return is_correct(protocol.extract_answer(text), golds, max_words)


def build_memorization_set(trajs: Sequence[Trajectory], correct: Sequence[bool], golds: dict[str, list[str]],
                           metadata: dict[str, dict], rewriter: Rewriter, protocol: Protocol, tokenizer,
                           max_words: int = 10) -> tuple[list[MemoryExample], dict[str, float]]:
    """The step's memorization set T and {"candidates", "accepted"} counts."""
    items = select_for_rewrite(trajs, correct, metadata)
    texts = rewriter(items) if items else []
    out: list[MemoryExample] = []
    for it, text in zip(items, texts, strict=True):
        if not accept_rewrite(text, golds[it.question_id], protocol, max_words):
            continue
        _, prompt_ids = protocol.prompt_ids(tokenizer, it.question)
        ids = encode_untrusted(tokenizer, text, allow=protocol.tags)  # the rewriter's text: only our tags
        out.append(MemoryExample(it.question_id, text, list(prompt_ids), ids))
    return out, {"candidates": float(len(items)), "accepted": float(len(out))}


# ----------------------------------------------------------------------------- loss
def chunk(examples: Sequence[MemoryExample], n_chunks: int, index: int) -> list[MemoryExample]:
    """The `index`-th of `n_chunks` near-equal consecutive slices (some may be empty)."""
    k, r = divmod(len(examples), n_chunks)
    start = index * k + min(index, r)
    return list(examples[start: start + k + (1 if index < r else 0)])


def nll_sum(model, examples: Sequence[MemoryExample], pad_id: int) -> tuple[torch.Tensor, int]:
    """(sum of -log pi(y_t | x, y_<t) over the completion tokens of `examples`, number of those tokens).

    Logits are computed only from the first completion-predicting position on (`logits_to_keep`): a
    (B, T, vocab) fp32 tensor over the prompt too, and its log-softmax and gradient, are the largest
    transient of an RL micro-batch on a 49k vocabulary."""
    device = next(model.parameters()).device
    seqs = [e.prompt_ids + e.completion_ids for e in examples]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width + 1), -100, dtype=torch.long)  # one pad column: no slicing below
    for i, (e, s) in enumerate(zip(examples, seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        labels[i, len(e.prompt_ids): len(s)] = torch.tensor(e.completion_ids)
    start = max(min(len(e.prompt_ids) for e in examples) - 1, 0)  # the first position that predicts a label
    input_ids, attention = input_ids.to(device), attention.to(device)
    target = labels[:, start + 1:].to(device)  # position t predicts token t + 1
    logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=width - start).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll, int((target != -100).sum().item())
