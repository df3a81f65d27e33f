"""Outcome rewards of R1-Searcher++ and R1-Searcher (METHOD.md A.5, B.4): pure functions of one
rollout's parsed outcome (answer text, gold answers, retrieval count, format violations), or of one
question's group of rollouts (the group reward).

R1-Searcher++ (A.5):   R = R_format + R_answer + R_group
    R_format = 0 if the protocol validator finds nothing wrong, else `format_penalty` (-2)
    R_answer = 1 iff CEM(answer, gold) and word_count(answer) <= 10  (the cap stops candidate lists)
    R_group  : over the G rollouts of one question, C = the correct ones (R_answer = 1), t_j their
               retrieval counts, sigma = std(t_j : j in C) (population std by default; the sample std
               of a single value is 0); the correct rollout(s) with t_j = min_C t get
               min(f(sigma, t), eta), everyone else 0. The functional form f is reconstructed, not
               read in the paper, so it is configurable:
                   two_sigma_sq  2 sigma^2       (default, [recalled])
                   sigma         sigma
                   range         max_C t - min_C t
               Ties at the minimum all get the bonus; sigma = 0 (every correct rollout searched
               equally often) and "no correct rollout" give no bonus.

R1-Searcher (B.4, the paper's definitions, not the reward servers' variants):
    stage 1  R = 0.5 [retrievals >= 1] + 0.5 [format correct]              in {0, 0.5, 1}
    stage 2  R = F1(answer, gold) + (0 if format correct else -2)          in [-2, 1]
    (a missing answer has F1 0)

Every component is a separate function so the trainer can log each one on its own
(`rewards/<name>/mean` in MLflow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from searchrl.metrics import score, word_count

GROUP_FORMS = ("two_sigma_sq", "sigma", "range")


# ----------------------------------------------------------------------------- R1-Searcher++
def format_reward(violations: Sequence[str], penalty: float = -2.0) -> float:
    """0 when the protocol validator reported no violation, else `penalty`."""
    return 0.0 if not violations else float(penalty)


def is_correct(answer: str | None, golds: Sequence[str], max_words: int = 10) -> bool:
    """R1-Searcher++'s correctness: CEM against any gold, and at most `max_words` words."""
    if answer is None or not answer.strip():
        return False
    return word_count(answer) <= max_words and score(answer, list(golds))["cem"] == 1.0


def answer_reward(answer: str | None, golds: Sequence[str], max_words: int = 10) -> float:
    return 1.0 if is_correct(answer, golds, max_words) else 0.0


def retrieval_spread(counts: Sequence[int], form: str = "two_sigma_sq", std: str = "population") -> float:
    """f(retrieval counts of the correct rollouts) before clipping; 0 for fewer than two counts."""
    if form not in GROUP_FORMS:
        raise ValueError(f"group reward form '{form}': expected one of {', '.join(GROUP_FORMS)}")
    if std not in ("population", "sample"):
        raise ValueError(f"group reward std '{std}': expected population or sample")
    n = len(counts)
    if n < 2:
        return 0.0
    if form == "range":
        return float(max(counts) - min(counts))
    mean = sum(counts) / n
    var = sum((c - mean) ** 2 for c in counts) / (n if std == "population" else n - 1)
    return 2.0 * var if form == "two_sigma_sq" else math.sqrt(var)


def group_rewards(correct: Sequence[bool], retrievals: Sequence[int], form: str = "two_sigma_sq",
                  std: str = "population", clip: float = 2.0) -> list[float]:
    """R_group for the rollouts of ONE question (aligned lists)."""
    if len(correct) != len(retrievals):
        raise ValueError(f"group_rewards: {len(correct)} correctness flags for {len(retrievals)} "
                         f"retrieval counts")
    counts = [int(t) for c, t in zip(correct, retrievals, strict=True) if c]
    if not counts:
        return [0.0] * len(correct)
    bonus = min(retrieval_spread(counts, form, std), float(clip))
    t_min = min(counts)
    return [bonus if c and int(t) == t_min else 0.0 for c, t in zip(correct, retrievals, strict=True)]


# ----------------------------------------------------------------------------- R1-Searcher
def retrieval_reward(retrievals: int) -> float:
    """Stage 1: 0.5 for calling the retriever at least once."""
    return 0.5 if retrievals >= 1 else 0.0


def stage1_format_reward(violations: Sequence[str]) -> float:
    """Stage 1: 0.5 for a correct format (no penalty otherwise)."""
    return 0.5 if not violations else 0.0


def f1_reward(answer: str | None, golds: Sequence[str]) -> float:
    """Stage 2: word-level F1 against the best gold (0 without an answer)."""
    if answer is None:
        return 0.0
    return score(answer, list(golds))["f1"]
