"""Means with 95% bootstrap intervals over questions, and paired differences between two methods.

The unit of resampling is the question (the evaluation's sample of the question population): each
question contributes one value, the mean of its samples when a method answered it several times
(`evaluate.samples` x `evaluate.seeds`). The interval is the percentile bootstrap: `resamples` draws
of n questions with replacement, the mean of each draw, the 2.5th and 97.5th percentiles of those
means (Efron & Tibshirani 1993, ch. 13). A paired comparison resamples the per-question differences
a - b over the questions both methods answered, so the between-question variance common to both
cancels (a far narrower interval than two separate ones).

Resampling is seeded (`seed`), so a report is reproducible bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

LEVEL = 0.95


def bootstrap_mean(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                   level: float = LEVEL) -> tuple[float, float | None, float | None]:
    """(mean, lo, hi) of `values` (one per question); lo / hi are None when `resamples` is 0 or there
    are no values (mean 0.0 then)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return 0.0, None, None
    mean = float(x.mean())
    if resamples <= 0:
        return mean, None, None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // x.size)  # bounded memory for large n x resamples
    for a in range(0, resamples, chunk):
        b = min(resamples, a + chunk)
        means[a:b] = x[rng.integers(0, x.size, size=(b - a, x.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return mean, float(lo), float(hi)


def per_question_mean(pairs: Sequence[tuple[str, float]]) -> dict[str, float]:
    """{question id: mean of its values} from (question id, value) pairs (several samples per id)."""
    sums: dict[str, list[float]] = {}
    for qid, v in pairs:
        acc = sums.setdefault(qid, [0.0, 0.0])
        acc[0] += float(v)
        acc[1] += 1.0
    return {qid: s / n for qid, (s, n) in sums.items()}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], resamples: int = 1000, seed: int = 0,
                      level: float = LEVEL) -> dict:
    """Mean of a[q] - b[q] over the questions q in both, with its bootstrap interval:
    {"diff", "lo", "hi", "n"} (lo / hi None without resamples or common questions)."""
    common = sorted(set(a) & set(b))
    diff, lo, hi = bootstrap_mean([a[q] - b[q] for q in common], resamples, seed, level)
    return {"diff": diff, "lo": lo, "hi": hi, "n": len(common)}
