from __future__ import annotations

import pytest

from searchrl.data.chunking import chunk_passage, chunk_passages, chunk_words, clean_kilt
from searchrl.data.schema import Passage


def test_chunk_words_splits_on_whitespace_with_a_short_tail():
    text = " ".join(f"w{i}" for i in range(25))
    chunks = chunk_words(text, 10)
    assert [len(c.split()) for c in chunks] == [10, 10, 5]
    assert " ".join(chunks).split() == text.split()  # nothing lost, order kept
    assert chunk_words("  \n ", 10) == []
    with pytest.raises(ValueError):
        chunk_words("a b", 0)


def test_clean_kilt_removes_markers():
    assert clean_kilt("Section::::History. BULLET::::- first item") == "History. - first item"


def test_long_passage_becomes_numbered_chunks_with_title_prepended():
    p = Passage("kilt-12", "Anarchism", " ".join(f"w{i}" for i in range(250)), "kilt")
    chunks = chunk_passage(p, 100, title_in_text=True)
    assert [c.id for c in chunks] == ["kilt-12#0", "kilt-12#1", "kilt-12#2"]
    assert all(c.title == "Anarchism" and c.source == "kilt" for c in chunks)
    # R1-Searcher's KILT line body: "{title}   {100 words}"
    assert chunks[0].text == "Anarchism   " + " ".join(f"w{i}" for i in range(100))
    assert len(chunks[2].text.split()) == 1 + 50


def test_without_title_in_text_and_short_passages_keep_their_id():
    long = Passage("p", "T", "Section::::Intro. " + "x " * 30)
    chunks = chunk_passage(long, 20, title_in_text=False)
    assert [c.id for c in chunks] == ["p#0", "p#1"]
    assert chunks[0].text.startswith("Intro. x x")
    short = chunk_passage(Passage("s", "T", "only four words here"), 100, title_in_text=False)
    assert [(c.id, c.text) for c in short] == [("s", "only four words here")]


def test_chunk_passages_zero_is_identity():
    ps = [Passage("a", "A", "one two three"), Passage("b", "", "four five")]
    assert chunk_passages(ps, 0) == ps
    out = chunk_passages(ps, 2, title_in_text=True)
    assert [c.id for c in out] == ["a#0", "a#1", "b"]
    assert out[2].text == "four five"  # no title to prepend
