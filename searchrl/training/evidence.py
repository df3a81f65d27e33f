"""Gold evidence of real multi-hop QA records: what the oracle sampler searches for, which retrieved
sentence it restates, and what the oracle rewriter recalls (searchrl/training/sampling.py,
searchrl/training/memorization.py).

What the readers keep (searchrl/data/formats.py; `formats.EVIDENCE_FORMATS` lists which formats do):

    decomposition  MuSiQue `question_decomposition`: per hop {question, answer, title}; the hop's
                   sub-question ("Green >> performer", "#1 >> spouse") with earlier hop answers put
                   in for "#k".
    gold_titles    the supporting paragraphs' titles: HotpotQA / 2Wiki `supporting_facts`, IRCoT
                   `contexts[].is_supporting`, MuSiQue `paragraphs[].is_supporting`.
    gold_facts     HotpotQA / 2Wiki only: the supporting sentences as [title, sentence] (from
                   `supporting_facts` [title, sentence index] and the record's `context`).
    evidences      2Wiki only: its [subject, relation, object] triples.

`evidence_steps(question, answers, metadata)` turns that into one `EvidenceStep` per supporting
paragraph, in reading order:

    MuSiQue    one step per hop, in the decomposition's order; query wordings: the sub-question with
               earlier answers substituted ("Steve Hillage spouse"), the gold title plus the
               sub-question's keywords, the title alone. Anchors (what the restated sentence should
               mention): the hop's answer, then the final answer.
    title only (HotpotQA, 2Wiki, IRCoT) one step per gold title: titles named in the question first
               (that is where a reader starts; the others are bridge entities found on the way), then
               the rest in the source's order. Query wordings: the title plus the question's first
               `TITLE_KEYWORDS` keywords (content words not in the title), then the title alone.
               Anchors: the answer (not yes / no), the other gold titles, 2Wiki evidence objects.

The oracle searches every wording of a step and uses the first whose top-k brings the gold paragraph
back (`oracle_variants` rotate the order). Share of gold paragraphs in the top 3
(bench/results/evidence_oracle.json, `python bench/bench_evidence_oracle.py`):

    IRCoT HotpotQA 500, 1,000 gold paragraphs  title + 2 keywords  title   first that works  question
      BM25 over hotpotqa_local's 54,764          83.1%              89.3%   92.3%             57.1%
      BM25 over the 4,858 IRCoT contexts         87.3%              92.2%   94.7%             60.1%
      MiniLM (dense) over the same 4,858         93.7%              97.4%   98.6%             70.3%
    MuSiQue-Ans dev, 6,380 hops, BM25 54,764:  sub-question 56.2%, title + keywords 69.0%, title 66.6%,
      first that works 72.3%, question 26.2% (the corpus lacks part of MuSiQue's gold paragraphs).

`fact_sentence(text, anchors, question, gold_sentences)` picks the sentence of a retrieved passage
that restates the step's fact: among the gold supporting sentences the passage holds (all of its
sentences when it holds none), the sentence mentioning the most (and the most important) anchors,
then the most question keywords, then the first; a sentence with CJK characters only as a last
resort (the protocols' format check rejects them in the model's text). The sentence is always
verbatim text of the passage as the agent saw it (sanitised, cut to `agent.max_passage_words`),
never written by us.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bm25s.stopwords import STOPWORDS_EN_PLUS

from searchrl.agent.protocols import CJK_RE, passage_view, sanitize_passage

MAX_KEYWORDS = 6  # keywords of a MuSiQue sub-question (short already)
TITLE_KEYWORDS = 2  # keywords of a HotpotQA / 2Wiki question next to a gold title (more dilute the title)
STOPWORDS = frozenset(STOPWORDS_EN_PLUS)  # bm25s' English list (179 words, question words included)
_WORD = re.compile(r"\w+")
_HOP_REF = re.compile(r"#(\d+)")
_QUALIFIER = re.compile(r"\s*\([^()]*\)\s*$")  # "Green (Steve Hillage album)" -> "Green"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "no", "vs", "mt", "ft", "co", "inc", "ltd",
                            "gen", "col", "lt", "sgt", "rev", "prof", "u.s", "u.k", "e.g", "i.e", "etc"})


@dataclass(frozen=True)
class EvidenceStep:
    """One supporting paragraph to find: its title, query wordings (preferred first), and the strings
    (most important first) whose mention marks the sentence that states the fact."""

    title: str
    queries: tuple[str, ...]
    anchors: tuple[str, ...] = ()
    gold_sentences: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- text helpers
def norm(text: str) -> str:
    """Lower case, single spaces, tags and special tokens removed (how titles are compared)."""
    return " ".join(sanitize_passage(str(text)).lower().split())


def bare_title(title: str) -> str:
    """The title without a trailing disambiguation: "Ed Wood (film)" -> "Ed Wood"."""
    return _QUALIFIER.sub("", title).strip() or title.strip()


def mentions(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as whole words, ignoring case and spacing."""
    p = norm(phrase)
    return bool(p) and re.search(r"(?<!\w)" + re.escape(p) + r"(?!\w)", norm(text)) is not None


def keywords(text: str, exclude: str = "", limit: int = MAX_KEYWORDS) -> list[str]:
    """Content words of `text` in order: no stopwords, none of `exclude`'s words, no repeats."""
    skip = {w.lower() for w in _WORD.findall(exclude)} | STOPWORDS
    out: list[str] = []
    for w in _WORD.findall(text):
        if w.lower() not in skip and w.lower() not in {o.lower() for o in out}:
            out.append(w)
    return out[:limit] if limit else out


def split_sentences(text: str) -> list[str]:
    """Sentences of one passage, verbatim (each is a substring of `text`). A period after an initial
    ("J. R. R. Tolkien") or a common abbreviation ("Dr.", "U.S.") does not end a sentence."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        before = text[start: m.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        if len(last) == 1 and last.isalpha() or last in _ABBREVIATIONS:
            continue
        out.append(text[start: m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def visible_text(title: str, text: str, max_words: int, specials: Sequence[str] = ()) -> str:
    """A passage's body exactly as the protocols print it in a document block (`passage_view`:
    sanitised, title words counted in the cap), without the cut marker " ..."."""
    _, body = passage_view(title, text, max_words, tuple(specials))
    return body[: -len(" ...")] if body.endswith(" ...") else body


def shown_title(title: str, text: str, max_words: int, specials: Sequence[str] = ()) -> str:
    """The title as a document block prints it ("" where `passage_view` drops it)."""
    return passage_view(title, text, max_words, tuple(specials))[0]


def safe_wording(text: str) -> str:
    """A query wording built from data: no protocol tags or special tokens (data can never open or
    close a tag), one line. The engine cleans it further per protocol (`Protocol.clean_query`)."""
    return " ".join(sanitize_passage(text).split())


# ----------------------------------------------------------------------------- steps
def has_evidence(metadata: dict) -> bool:
    """True when the record carries gold evidence this module can use (not Knowledge World hops)."""
    steps = metadata.get("decomposition") or []
    return (any(isinstance(s, dict) and str(s.get("title") or "").strip() for s in steps)
            or any(str(t).strip() for t in metadata.get("gold_titles") or []))


def _answer_anchors(answers: Sequence[str]) -> list[str]:
    return [a for a in answers if a and norm(a) not in ("yes", "no")]


def _dedupe(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i and i.strip()))


def substitute_hops(question: str, answers: Sequence[str]) -> str:
    """MuSiQue sub-question with "#k" replaced by hop k's answer and ">>" by a space."""
    def hop(m: re.Match) -> str:
        k = int(m.group(1)) - 1
        return answers[k] if 0 <= k < len(answers) else m.group(0)

    return " ".join(_HOP_REF.sub(hop, question).replace(">>", " ").split())


def decomposition_steps(decomposition: Sequence[dict], answers: Sequence[str]) -> list[EvidenceStep]:
    hop_answers = [str(s.get("answer", "")) for s in decomposition]
    out = []
    for i, s in enumerate(decomposition):
        title = str(s.get("title") or "")
        sub = substitute_hops(str(s.get("question", "")), hop_answers[:i])
        queries = _dedupe([safe_wording(sub), safe_wording(f"{title} {' '.join(keywords(sub, title))}"),
                           safe_wording(title)])
        if queries:  # a hop with neither a sub-question nor a title cannot be searched for
            out.append(EvidenceStep(title, queries, _dedupe([*_answer_anchors([hop_answers[i]]),
                                                             *_answer_anchors(answers)])))
    return out


def title_steps(question: str, answers: Sequence[str], metadata: dict) -> list[EvidenceStep]:
    titles = [str(t) for t in metadata.get("gold_titles") or [] if str(t).strip()]
    titles = sorted(titles, key=lambda t: not mentions(question, bare_title(t)))  # stable: named ones first
    facts: dict[str, list[str]] = {}
    for item in metadata.get("gold_facts") or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            facts.setdefault(str(item[0]), []).append(str(item[1]))
    triples = [e for e in metadata.get("evidences") or [] if isinstance(e, (list, tuple)) and len(e) == 3]
    out = []
    for t in titles:
        kw = " ".join(keywords(question, t, TITLE_KEYWORDS))
        objects = [str(o) for s, _, o in triples if mentions(t, str(s)) or mentions(str(s), bare_title(t))]
        others = [bare_title(o) for o in titles if o != t]
        out.append(EvidenceStep(t, _dedupe([safe_wording(f"{t} {kw}"), safe_wording(t)]),
                                _dedupe([*_answer_anchors(answers), *objects, *others]), tuple(facts.get(t, ()))))
    return out


def evidence_steps(question: str, answers: Sequence[str], metadata: dict) -> list[EvidenceStep]:
    """The record's supporting paragraphs in reading order (see the module docstring); [] without evidence."""
    decomposition = [s for s in metadata.get("decomposition") or [] if isinstance(s, dict)]
    if any(str(s.get("title") or "").strip() for s in decomposition):
        return decomposition_steps(decomposition, answers)
    return title_steps(question, answers, metadata)


# ----------------------------------------------------------------------------- sentences
def fact_sentence(text: str, anchors: Sequence[str], question: str, gold_sentences: Sequence[str] = ()) -> str:
    """The sentence of `text` that states the step's fact (see the module docstring); "" for no text."""
    sentences = split_sentences(text)
    if not sentences:
        return ""
    golds = [norm(g) for g in gold_sentences if norm(g)]
    gold = [s for s in sentences if any(g in norm(s) or (len(norm(s)) > 20 and norm(s) in g) for g in golds)]
    sentences = gold or sentences  # several gold sentences of one paragraph: the anchors decide
    qwords = {w.lower() for w in keywords(question, limit=0)}

    def score(item: tuple[int, str]) -> tuple:
        i, s = item
        weight = sum(len(anchors) - j for j, a in enumerate(anchors) if mentions(s, a))
        overlap = len(qwords & {w.lower() for w in _WORD.findall(s)})
        return bool(CJK_RE.search(s)), -weight, -overlap, i  # the format check rejects CJK in model text

    return min(enumerate(sentences), key=score)[1]


def title_matches(hit_title: str, gold_title: str) -> bool:
    return norm(hit_title) == norm(gold_title) != ""
