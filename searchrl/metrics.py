"""Answer metrics exactly as R1-Searcher's `evaluation/metric_calc_rule.py` (METHOD.md section C).

Pure standard library: rewards, evaluation and validation all import this, so it must stay free of
torch, numpy and pandas.

    normalize_answer("The U.S._Army!")  -> "u s army"     (punctuation becomes a space, not nothing)
    score(" Yes ", ["yes"])             -> {"em": 1.0, "f1": 1.0, "cem": 1.0}

Quirks kept on purpose, because the published numbers depend on them:
- `bool_mapping` maps only the exact strings "True"/"False" (not " True", not "true").
- F1 is 0 whenever either side normalises to yes/no/noanswer and the two sides differ.
- CEM splits on a single space, so an empty normalised gold is `[""]` and only matches an empty
  prediction. Two empty strings therefore score EM 1, CEM 1 but F1 0 (no common tokens).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_PUNCT = frozenset(string.punctuation + "\u2018\u2019\u00b4`")  # plus ‘ ’ ´ and the backtick
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_YES_NO = ("yes", "no", "noanswer")
KEYS = ("em", "f1", "cem")


def bool_mapping(s: str) -> str:
    """"True" -> "yes", "False" -> "no"; every other string (even " True") is returned unchanged."""
    if s == "True":
        return "yes"
    if s == "False":
        return "no"
    return s


def normalize_answer(s: str) -> str:
    """Underscores to spaces, lower-case, punctuation to spaces, drop a/an/the, collapse whitespace."""
    s = s.replace("_", " ").lower()
    s = "".join(" " if ch in _PUNCT else ch for ch in s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _norm(s: str) -> str:
    return normalize_answer(bool_mapping(s))


def exact_match(prediction: str, gold: str) -> bool:
    return _norm(prediction) == _norm(gold)


def f1_score(prediction: str, gold: str) -> tuple[float, float, float]:
    """Token F1 of the normalised strings -> (f1, precision, recall), with the yes/no/noanswer rule."""
    pred, ref = _norm(prediction), _norm(gold)
    if (pred in _YES_NO or ref in _YES_NO) and pred != ref:
        return 0.0, 0.0, 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def cover_em(prediction: str, gold: str) -> bool:
    """Cover-EM ("cover_em_1", ACC_R): every normalised gold token occurs among the prediction tokens.

    Order, contiguity and multiplicity are ignored. Splits on " " like the original, so an empty gold
    (`[""]`) is covered only by an empty prediction.
    """
    pred_tokens = _norm(prediction).split(" ")
    return all(tok in pred_tokens for tok in _norm(gold).split(" "))


def score(prediction: str, golds: Sequence[str] | str) -> dict[str, float]:
    """{"em", "f1", "cem"} in [0, 1], each the max over the gold aliases (F1: the best (f1, p, r) tuple)."""
    if isinstance(golds, str):
        golds = [golds]
    if not golds:
        raise ValueError("score(): golds is empty; every question needs at least one gold answer")
    best_f1 = max((f1_score(prediction, g) for g in golds), key=lambda t: t[0])
    return {
        "em": float(max(exact_match(prediction, g) for g in golds)),
        "f1": float(best_f1[0]),
        "cem": float(max(cover_em(prediction, g) for g in golds)),
    }


def aggregate(scores: Iterable[Mapping[str, float]], limit: int | None = None,
              ndigits: int | None = None) -> dict[str, float]:
    """Mean of per-question scores as percentages (x100) plus the count `n`.

    `limit=2000` and `ndigits=1` reproduce the R1-Searcher eval script (first 2,000 rows, one
    decimal); the defaults keep every row and full precision. An empty input gives zeros and n=0.
    """
    rows = list(scores)[:limit] if limit is not None else list(scores)
    n = len(rows)
    out: dict[str, float] = {}
    for key in KEYS:
        value = 100.0 * sum(float(r[key]) for r in rows) / n if n else 0.0
        out[key] = round(value, ndigits) if ndigits is not None else value
    out["n"] = n
    return out


def word_count(s: str) -> int:
    """Whitespace-separated words of the raw answer (R1-Searcher++'s <=10-word answer-reward cap)."""
    return len(s.split())
