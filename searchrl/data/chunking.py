"""Split passages into fixed-size word chunks, as R1-Searcher's KILT corpus (`split_kilt_to_100.py`).

R1-Searcher joins a KILT page's paragraphs, removes the `BULLET::::` and `Section::::` markers, splits on
whitespace and writes every 100 words as one line `"{idx}\\t{title}   {chunk}"`. Here a chunk keeps its
page title in `title` (retrieval metrics match gold titles) and, with `title_in_text`, also starts its
text with the title, which is what R1-Searcher's encoder and agent saw.

A passage of at most `chunk_words` words stays one passage and keeps its id; a longer one becomes
`<id>#0`, `<id>#1`, ... (the last chunk may be shorter).
"""

from __future__ import annotations

import re

from searchrl.data.schema import CHUNK_TITLE_SEP, Passage

KILT_MARKERS = re.compile(r"BULLET::::|Section::::")


def clean_kilt(text: str) -> str:
    """Drop KILT's list / section markers (`BULLET::::- item`, `Section::::History.`)."""
    return KILT_MARKERS.sub("", text)


def chunk_words(text: str, n: int) -> list[str]:
    """Whitespace words of `text` in runs of n (n >= 1); [] for blank text."""
    if n < 1:
        raise ValueError(f"chunk size must be >= 1, got {n}")
    words = text.split()
    return [" ".join(words[i:i + n]) for i in range(0, len(words), n)]


def chunk_passage(p: Passage, n: int, title_in_text: bool = True) -> list[Passage]:
    chunks = chunk_words(clean_kilt(p.text), n)
    if title_in_text and p.title:
        chunks = [f"{p.title}{CHUNK_TITLE_SEP}{c}" for c in chunks]
    if len(chunks) <= 1:
        return [Passage(p.id, p.title, chunks[0] if chunks else p.text, p.source)]
    return [Passage(f"{p.id}#{k}", p.title, c, p.source) for k, c in enumerate(chunks)]


def chunk_passages(passages: list[Passage], n: int, title_in_text: bool = True) -> list[Passage]:
    """Chunk every passage (n = 0 returns the passages unchanged)."""
    if n <= 0:
        return list(passages)
    out: list[Passage] = []
    for p in passages:
        out.extend(chunk_passage(p, n, title_in_text))
    return out
