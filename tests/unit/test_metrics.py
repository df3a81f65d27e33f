"""Metric definitions of METHOD.md section C, checked against hand-computed values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from searchrl.metrics import (
    aggregate,
    bool_mapping,
    cover_em,
    exact_match,
    f1_score,
    normalize_answer,
    score,
    word_count,
)


@pytest.mark.parametrize("raw, expected", [
    ("U.S.", "u s"),                               # punctuation becomes a space, not nothing
    ("U.S. Route 22", "u s route 22"),
    ("Don't", "don t"),
    ("rock-and-roll", "rock and roll"),
    ("New_York_City", "new york city"),            # underscore -> space first
    ("The Beatles", "beatles"),
    ("A Tale of Two Cities", "tale of two cities"),
    ("an apple a day", "apple day"),
    ("theatre", "theatre"),                         # articles only as whole words
    ("Anthem", "anthem"),
    ("The.The", ""),                                # "the the" -> both removed
    ("a", ""),
    ("  James   Madison \n", "james madison"),    # whitespace collapsed and stripped
    ("\u2018quoted\u2019", "quoted"),               # curly single quotes
    ("it\u00b4s", "it s"),                          # acute accent
    ("`code`", "code"),                             # backtick
    ("\u201cdouble\u201d", "\u201cdouble\u201d"),   # curly double quotes are NOT in the set
    ("Caf\u00e9", "caf\u00e9"),                     # non-ASCII letters kept
    ("$1,000.50", "1 000 50"),
    ("", ""),
    ("!!!", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("True", "yes"), ("False", "no"),
    ("true", "true"), ("false", "false"), (" True", " True"), ("True ", "True "),
    ("TRUE", "TRUE"), ("yes", "yes"), ("", ""),
])
def test_bool_mapping_exact_strings_only(raw, expected):
    assert bool_mapping(raw) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("U.S.", "u s", True),
    ("the Beatles", "Beatles!", True),
    ("True", "yes", True),                          # bool mapping on the prediction
    ("yes", "True", True),                          # ... and on the gold
    ("true", "yes", False),                         # lower-case "true" is not mapped
    ("Paris, France", "Paris", False),
    ("", "", True),
    ("", "Paris", False),
    ("New_York", "new york", True),
])
def test_exact_match(pred, gold, expected):
    assert exact_match(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    # identical
    ("James Madison", "james madison", (1.0, 1.0, 1.0)),
    # 1 common of 3 pred / 2 gold: p=1/3 r=1/2 f1=2*(1/6)/(5/6)=0.4
    ("president james polk", "james madison", (0.4, 1 / 3, 0.5)),
    # articles dropped before counting: pred [beatles, band] gold [beatles] -> p=1/2 r=1 f1=2/3
    ("The Beatles band", "the Beatles", (2 / 3, 0.5, 1.0)),
    # multiplicity: Counter & gives min counts -> common = 1 (not 2); p=1/2 r=1 f1=2/3
    ("paris paris", "paris", (2 / 3, 0.5, 1.0)),
    # pred [new,york,new,york,city] gold [new,york]: common 2 -> p=2/5 r=1 f1=4/7
    ("new york new york city", "New York", (4 / 7, 0.4, 1.0)),
    # punctuation splits tokens: "u s army" vs "u s": common 2, p=2/3, r=1, f1=0.8
    ("U.S. Army", "U.S.", (0.8, 2 / 3, 1.0)),
    # no overlap
    ("London", "Paris", (0.0, 0.0, 0.0)),
    # yes/no rule: either side yes/no/noanswer and different -> 0 even with overlap
    ("yes it is", "yes", (0.0, 0.0, 0.0)),
    ("yes", "yes it is", (0.0, 0.0, 0.0)),
    ("no", "no way", (0.0, 0.0, 0.0)),
    ("noanswer", "no answer", (0.0, 0.0, 0.0)),
    ("Yes.", "yes", (1.0, 1.0, 1.0)),
    ("True", "yes", (1.0, 1.0, 1.0)),
    ("False", "yes", (0.0, 0.0, 0.0)),
    # empty strings: no common tokens -> 0 (while EM and CEM are 1)
    ("", "", (0.0, 0.0, 0.0)),
    ("", "Paris", (0.0, 0.0, 0.0)),
    ("Paris", "", (0.0, 0.0, 0.0)),
])
def test_f1_score(pred, gold, expected):
    got = f1_score(pred, gold)
    assert got == pytest.approx(expected)
    assert all(isinstance(x, float) for x in got)


@pytest.mark.parametrize("pred, gold, expected", [
    ("He was James Madison, the 4th president", "James Madison", True),
    ("Madison James", "James Madison", True),       # order ignored
    ("James ... and Madison", "James Madison", True),  # contiguity ignored
    ("James", "James James", True),                 # multiplicity ignored
    ("James", "James Madison", False),
    ("jamesmadison", "James Madison", False),       # whole tokens only, no substring match
    ("party", "art", False),
    ("U.S. Route 22 in New Jersey", "U.S. Route 22", True),
    ("the answer is True", "yes", False),           # bool mapping only on exact strings
    ("True", "yes", True),
    ("", "", True),                                 # [""] covers [""]
    ("Paris", "", False),                           # empty gold matches only an empty prediction
    ("", "Paris", False),
    ("Paris", "The", False),                        # gold normalises to empty
    ("", "the", True),
])
def test_cover_em(pred, gold, expected):
    assert cover_em(pred, gold) is expected


@pytest.mark.parametrize("pred, golds, expected", [
    ("James Madison", ["James Madison"], {"em": 1.0, "f1": 1.0, "cem": 1.0}),
    ("James Madison", "James Madison", {"em": 1.0, "f1": 1.0, "cem": 1.0}),  # a bare string gold
    # alias max: everything from the 2nd alias (alias 1 has F1 0)
    ("JFK", ["John F. Kennedy", "JFK"], {"em": 1.0, "f1": 1.0, "cem": 1.0}),
    # metrics come from different aliases: F1 from alias 1 (p=1, r=2/3 -> 0.8; alias 2 gives 2/3),
    # CEM only from alias 2 (alias 1 also needs "jr")
    ("madison james", ["James Madison Jr", "Madison"], {"em": 0.0, "f1": 0.8, "cem": 1.0}),
    ("London", ["Paris", "Lyon"], {"em": 0.0, "f1": 0.0, "cem": 0.0}),
    ("", [""], {"em": 1.0, "f1": 0.0, "cem": 1.0}),
    (" Yes ", ["yes"], {"em": 1.0, "f1": 1.0, "cem": 1.0}),
    ("I don't know.", ["Paris"], {"em": 0.0, "f1": 0.0, "cem": 0.0}),
])
def test_score(pred, golds, expected):
    got = score(pred, golds)
    assert set(got) == {"em", "f1", "cem"}
    assert got == pytest.approx(expected)
    assert all(isinstance(v, float) for v in got.values())


def test_score_f1_takes_tuple_with_highest_f1():
    # alias 1: p=1/3 r=1 f1=0.5 ; alias 2: p=2/3 r=2/3 f1=2/3 -> the alias-2 tuple wins as a whole
    assert f1_score("b c x", "b") == pytest.approx((0.5, 1 / 3, 1.0))
    assert score("b c x", ["b", "b c y"])["f1"] == pytest.approx(2 / 3)


def test_score_rejects_empty_golds():
    with pytest.raises(ValueError, match="golds is empty"):
        score("Paris", [])


def test_aggregate_percentages():
    rows = [{"em": 1.0, "f1": 1.0, "cem": 1.0}, {"em": 0.0, "f1": 0.5, "cem": 1.0},
            {"em": 0.0, "f1": 0.0, "cem": 0.0}]
    got = aggregate(rows)
    assert got == pytest.approx({"em": 100 / 3, "f1": 50.0, "cem": 200 / 3, "n": 3})
    assert got["n"] == 3 and isinstance(got["n"], int)


def test_aggregate_limit_and_rounding_like_the_eval_script():
    rows = [{"em": 1.0, "f1": 1.0, "cem": 1.0}] * 2 + [{"em": 0.0, "f1": 0.0, "cem": 0.0}] * 5
    assert aggregate(rows, limit=3, ndigits=1) == {"em": 66.7, "f1": 66.7, "cem": 66.7, "n": 3}
    assert aggregate(iter(rows))["n"] == 7   # any iterable


def test_aggregate_empty():
    assert aggregate([]) == {"em": 0.0, "f1": 0.0, "cem": 0.0, "n": 0}


@pytest.mark.parametrize("s, n", [
    ("", 0), ("   ", 0), ("Paris", 1), (" James  Madison ", 2), ("U.S. Route 22", 3),
    ("one two three four five six seven eight nine ten", 10), ("a\tb\nc", 3),
])
def test_word_count(s, n):
    assert word_count(s) == n


def test_import_is_light():
    code = ("import sys, searchrl.metrics; "
            "heavy = [m for m in ('torch', 'numpy', 'pandas', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"searchrl.metrics pulled in: {out.stdout.strip()}"
