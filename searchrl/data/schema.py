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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

QA_COLUMNS = ["id", "dataset", "split", "question", "answers", "metadata"]
PASSAGE_COLUMNS = ["id", "title", "text", "source"]


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


def qa_records(df: pd.DataFrame) -> list[QARecord]:
    return [
        QARecord(id=str(r.id), dataset=str(r.dataset), split=str(r.split), question=str(r.question),
                 answers=[str(a) for a in r.answers], metadata=json.loads(r.metadata) if r.metadata else {})
        for r in df.itertuples(index=False)
    ]


def passages(df: pd.DataFrame) -> list[Passage]:
    return [Passage(str(r.id), str(r.title), str(r.text), str(r.source)) for r in df.itertuples(index=False)]


def read_qa(path: str | Path) -> list[QARecord]:
    return qa_records(pd.read_parquet(path))


def read_corpus(path: str | Path) -> list[Passage]:
    return passages(pd.read_parquet(path))
