"""The two record types that flow between stages, and their parquet form.

QA record  : id, dataset, split, question, answers[list[str]], metadata (dict; JSON in parquet)
Passage    : id, title, text, source

Metadata is stored as a JSON string so that sources with different metadata (Knowledge World hop
chains, HotpotQA supporting titles, MuSiQue decompositions) share one parquet schema.

Knowledge World metadata keys (all optional for other sources):
  qtype, hops[{subject, relation, object, source: internal|external, passage_id}],
  optimal_retrievals, gold_passage_ids, entities, fact_ids
"""

from __future__ import annotations

import json
import math
import numbers
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from searchrl.errors import InputError

QA_COLUMNS = ["id", "dataset", "split", "question", "answers", "metadata"]
PASSAGE_COLUMNS = ["id", "title", "text", "source"]


def _invisible(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) == "Cf"


def strip_text(value: str) -> str:
    """`value` without leading / trailing whitespace and invisible formatting characters (Unicode
    category Cf: zero-width space and joiners, BOM, bidi marks, soft hyphen...)."""
    start, end = 0, len(value)
    while start < end and _invisible(value[start]):
        start += 1
    while end > start and _invisible(value[end - 1]):
        end -= 1
    return value[start:end]


def is_blank(value: str) -> bool:
    """True when nothing visible is left after removing whitespace and invisible formatting
    characters (`strip_text`). Every reader and every validation suite uses this one definition."""
    return not strip_text(value)


def answer_text(value) -> str | None:
    """A gold answer as text: a string (`strip_text`) or a finite number; bools are "yes" / "no"
    (HotpotQA style). None for a blank string. ValueError for anything else (NaN, infinity, null, a
    list...), with the reason as its message."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"answer is {value!r}: expected a string or a finite number")
        return str(value)
    if isinstance(value, str):
        return strip_text(value) or None
    raise ValueError(f"expected a string answer, got {'null' if value is None else type(value).__name__}")


@dataclass
class QARecord:
    id: str
    dataset: str
    split: str
    question: str
    answers: list[str]
    metadata: dict = field(default_factory=dict)


@dataclass
class Passage:
    id: str
    title: str
    text: str
    source: str = ""


def passage_contents(title: str, text: str) -> str:
    """What the encoder and the agent see: title then text (R1-Searcher's KILT style).

    Chunks made with `title_in_text` already start with their title; don't repeat it."""
    if not title or text.startswith(title):
        return text
    return f"{title}\n{text}"


CHUNK_TITLE_SEP = "   "  # a `title_in_text` chunk is f"{title}{CHUNK_TITLE_SEP}{words}" (R1-Searcher's KILT split)


def passage_body(title: str, text: str) -> str:
    """The text without the title prefix of a `title_in_text` chunk, so the agent sees the title once.
    A natural passage that merely starts with its title ("Anarchism is ...") is left whole."""
    prefix = f"{title}{CHUNK_TITLE_SEP}"
    if title and text.startswith(prefix) and len(text) > len(prefix):
        return text[len(prefix):]
    return text


def qa_frame(records: list[QARecord]) -> pd.DataFrame:
    rows = [asdict(r) for r in records]
    for row in rows:
        row["metadata"] = json.dumps(row["metadata"], ensure_ascii=False, sort_keys=True)
    return pd.DataFrame(rows, columns=QA_COLUMNS)


def passage_frame(passages: list[Passage]) -> pd.DataFrame:
    return pd.DataFrame([asdict(p) for p in passages], columns=PASSAGE_COLUMNS)


def qa_records(df: pd.DataFrame, source: str = "QA frame") -> list[QARecord]:
    """Records of a QA frame; a blank question or an answer that is not text (NaN, null, blank) is an
    InputError naming `source`, the row (1-based) and the field."""
    out = []
    for n, r in enumerate(df.itertuples(index=False), start=1):
        if not isinstance(r.question, str) or is_blank(r.question):
            raise InputError(source, f"row {n}: empty question", field="question")
        answers = []
        items = [r.answers] if r.answers is None or isinstance(r.answers, str) else list(r.answers)
        try:
            for a in items:
                text = answer_text(a)
                if text is None:
                    raise ValueError("blank answer")
                answers.append(text)
        except ValueError as err:
            raise InputError(source, f"row {n}: {err}", field="answers") from None
        if not answers:
            raise InputError(source, f"row {n}: empty answer list", field="answers")
        out.append(QARecord(id=str(r.id), dataset=str(r.dataset), split=str(r.split), question=r.question,
                            answers=answers, metadata=json.loads(r.metadata) if r.metadata else {}))
    return out


def passages(df: pd.DataFrame, source: str = "corpus frame") -> list[Passage]:
    """Passages of a corpus frame; a blank text is an InputError naming `source`, row and field."""
    out = []
    for n, r in enumerate(df.itertuples(index=False), start=1):
        if not isinstance(r.text, str) or is_blank(r.text):
            raise InputError(source, f"row {n}: empty passage text", field="text")
        out.append(Passage(str(r.id), "" if r.title is None else str(r.title), r.text, str(r.source)))
    return out


def read_qa(path: str | Path) -> list[QARecord]:
    return qa_records(pd.read_parquet(path), str(path))


def read_corpus(path: str | Path) -> list[Passage]:
    return passages(pd.read_parquet(path), str(path))
