"""The per-step pieces of RL (searchrl/training/rl.py runs them): rewards as TRL reward functions, the
agent's rollouts turned into TRL's rollout outputs (ids, env masks, logprobs, reward inputs), the group
reward's firing share, the document-masking start-up check, a step's rollouts and their summary, and
the collapse guard. Pure functions and small classes, without TRL."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from searchrl import rewards as R
from searchrl.agent.backends import decode, encode
from searchrl.agent.engine import RolloutStats
from searchrl.agent.protocols import Protocol
from searchrl.agent.trajectory import Segment, Trajectory
from searchrl.config import RewardCfg
from searchrl.data.schema import QARecord
from searchrl.errors import SearchRLError


class MaskingError(SearchRLError):
    """Document tokens would reach the loss: the env mask is not applied."""


class TokenMismatchError(SearchRLError):
    """The token ids the loss sees are not the ids the rollout sampled and inserted."""


# ----------------------------------------------------------------------------- rewards as TRL functions
def reward_functions(cfg: RewardCfg, group_size: int) -> list[Callable]:
    """TRL reward functions for `cfg.kind`, each named after its component (TRL logs rewards/<name>/mean).

    They read the per-rollout fields the rollout function returns (`rollout_answer`, `retrievals`,
    `format_errors`) and the dataset's gold `answers`. The group reward needs whole groups: TRL hands
    the rollouts of one question as `group_size` consecutive rows."""
    words = cfg.max_answer_words

    def fmt(format_errors, **_):
        return [R.format_reward(e, cfg.format_penalty) for e in format_errors]

    def answer(rollout_answer, answers, **_):
        return [R.answer_reward(a, g, words) for a, g in zip(rollout_answer, answers, strict=True)]

    def group(rollout_answer, answers, retrievals, **_):
        correct = [R.is_correct(a, g, words) for a, g in zip(rollout_answer, answers, strict=True)]
        out: list[float] = []
        for s in range(0, len(correct), group_size):
            out.extend(R.group_rewards(correct[s: s + group_size], retrievals[s: s + group_size],
                                       cfg.group_form, cfg.group_std, cfg.group_clip))
        return out

    def retrieval(retrievals, **_):
        return [R.retrieval_reward(n) for n in retrievals]

    def stage1_format(format_errors, **_):
        return [R.stage1_format_reward(e) for e in format_errors]

    def f1(rollout_answer, answers, **_):
        return [R.f1_reward(a, g) for a, g in zip(rollout_answer, answers, strict=True)]

    fmt.__name__ = stage1_format.__name__ = "format"  # TRL names each reward by its function's name
    if cfg.kind == "r1searcher_pp":
        return [fmt, answer, group] if cfg.group_reward else [fmt, answer]
    if cfg.kind == "r1searcher_stage1":
        return [retrieval, stage1_format]
    return [f1, fmt]


# ----------------------------------------------------------------------------- rollouts -> TRL
def rollout_output(trajs: list[Trajectory], protocol: Protocol, mask_truncated: bool = False) -> dict:
    """What TRL's rollout_func returns: exact token ids, sampling logprobs, env_mask, and the fields
    the reward functions read. With mask_truncated, a rollout that ended on a length cap gets an
    all-zero env_mask: none of its tokens reaches the loss (it still counts in its group's rewards)."""
    def mask(t: Trajectory) -> list[int]:
        return [0] * len(t.completion_ids) if mask_truncated and t.finish_reason == "length" else t.env_mask

    return {
        "prompt_ids": [list(t.prompt_ids) for t in trajs],
        "completion_ids": [t.completion_ids for t in trajs],
        "logprobs": [t.logprobs for t in trajs],
        "env_mask": [mask(t) for t in trajs],
        "rollout_answer": [t.answer for t in trajs],
        "retrievals": [t.retrievals for t in trajs],
        "internal_steps": [t.internal_steps for t in trajs],
        "format_errors": [protocol.validate(t) for t in trajs],
    }


def total_rewards(reward_funcs: list[Callable], weights: list[float], out: dict, answers: list) -> list[float]:
    """The scalar reward of each rollout as the trainer sums it: sum_i w_i * f_i (None counts 0)."""
    totals = [0.0] * len(answers)
    for f, w in zip(reward_funcs, weights, strict=True):
        values = f(prompts=None, completions=None, completion_ids=None, answers=answers,
                   **{k: v for k, v in out.items() if k not in ("prompt_ids", "completion_ids", "logprobs",
                                                                "env_mask")})
        totals = [t + w * (v or 0.0) for t, v in zip(totals, values, strict=True)]
    return totals


def group_reward_share(correct: list[bool], retrievals: list[int], group_size: int, cfg: RewardCfg) -> float:
    """Share of the step's groups in which R1-Searcher++'s group reward gives some rollout a bonus
    (0 when the reward configuration has no group reward)."""
    if cfg.kind != "r1searcher_pp" or not cfg.group_reward or not correct:
        return 0.0
    fired = [any(R.group_rewards(correct[s: s + group_size], retrievals[s: s + group_size], cfg.group_form,
                                 cfg.group_std, cfg.group_clip))
             for s in range(0, len(correct), group_size)]
    return sum(fired) / len(fired)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First index where two id lists differ (a length difference counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_document_masking(protocol: Protocol, tokenizer) -> None:
    """Start-up assertion: a rollout with a document block gets env_mask 0 on exactly its tokens."""
    from searchrl.retrieval.base import Hit

    _, prompt_ids = protocol.prompt_ids(tokenizer, "Where was Ada Lovelace born?")
    docs = protocol.documents_text([Hit("p1", "Ada Lovelace", "Ada Lovelace was born in London.", 1.0)])
    parts = [("model", f"{protocol.query_open}birthplace of Ada Lovelace{protocol.query_close}"),
             ("env", docs), ("model", f"{protocol.answer_open}London{protocol.answer_close}")]
    traj = Trajectory("mask-check", "Where was Ada Lovelace born?", protocol.name, "", list(prompt_ids))
    for role, text in parts:
        ids = encode(tokenizer, text)
        traj.segments.append(Segment(role, text, ids, [0.0] * len(ids) if role == "model" else None))
    out = rollout_output([traj], protocol)
    ids, mask = out["completion_ids"][0], out["env_mask"][0]
    masked = [t for t, m in zip(ids, mask, strict=True) if m == 0]
    if len(mask) != len(ids) or decode(tokenizer, masked) != docs or sum(mask) != len(ids) - len(masked):
        raise MaskingError("start-up check: the env_mask of a rollout with a document block does not cover "
                           "exactly the document tokens")


@dataclass
class RolloutSummary:
    """Per-step search behaviour, logged next to TRL's metrics."""

    retrievals: float
    internal_steps: float
    format_valid: float
    correct: float
    answer_words: float
    answered_without_search: float  # reward-hacking audit (PEERS 5.11): answers with 0 retrievals
    model_tokens: int
    truncated: float = 0.0  # rollouts that ended on a length cap (finish "length")

    @classmethod
    def of(cls, trajs: list[Trajectory], outcome: dict, correct: list[bool], stats: RolloutStats
           ) -> RolloutSummary:
        n = max(len(trajs), 1)
        answers = [t.answer for t in trajs if t.answer is not None]
        return cls(retrievals=sum(t.retrievals for t in trajs) / n,
                   internal_steps=sum(t.internal_steps for t in trajs) / n,
                   format_valid=sum(not e for e in outcome["format_errors"]) / n,
                   correct=sum(correct) / n,
                   answer_words=sum(len(a.split()) for a in answers) / max(len(answers), 1),
                   answered_without_search=sum(t.answer is not None and t.retrievals == 0 for t in trajs) / n,
                   model_tokens=stats.generated_tokens,
                   truncated=sum(t.finish_reason == "length" for t in trajs) / n)


@dataclass
class StepRollouts:
    """Rollouts of one training step: whole groups of `num_generations` rollouts, question-major."""

    records: list[QARecord]
    trajs: list[Trajectory]
    out: dict
    informative: list[bool]  # per group: the rewards are not all equal
    generated_tokens: int = 0

    def groups(self, G: int) -> list[tuple[QARecord, slice]]:
        return [(r, slice(i * G, (i + 1) * G)) for i, r in enumerate(self.records)]

    @staticmethod
    def select(parts: list[tuple[StepRollouts, int]], G: int) -> StepRollouts:
        """A new batch from (batch, group index) pairs, in that order."""
        records, trajs, informative = [], [], []
        out: dict = {k: [] for k in parts[0][0].out} if parts else {}
        for batch, g in parts:
            sl = slice(g * G, (g + 1) * G)
            records.append(batch.records[g])
            trajs.extend(batch.trajs[sl])
            informative.append(batch.informative[g])
            for k, v in batch.out.items():
                out[k].extend(v[sl])
        return StepRollouts(records, trajs, out, informative)


# ----------------------------------------------------------------------------- collapse guard
class CollapseGuard:
    """Stops training when, over the last `window` steps, the mean format-valid rate fell by at least
    `format_drop` AND the mean reward by at least `reward_drop`, both against the best window so far
    (best = highest mean reward)."""

    def __init__(self, window: int, format_drop: float, reward_drop: float):
        self.window, self.format_drop, self.reward_drop = window, format_drop, reward_drop
        self.history: list[tuple[int, float, float]] = []
        self.best: tuple[int, float, float] | None = None  # (last step, format mean, reward mean)

    def window_reward(self) -> float | None:
        if len(self.history) < self.window:
            return None
        return sum(r for _, _, r in self.history[-self.window:]) / self.window

    def update(self, step: int, format_valid: float, reward: float) -> str | None:
        self.history.append((step, float(format_valid), float(reward)))
        if len(self.history) < self.window:
            return None
        last = self.history[-self.window:]
        f = sum(x for _, x, _ in last) / self.window
        r = sum(x for _, _, x in last) / self.window
        if self.best is None or r > self.best[2]:
            self.best = (step, f, r)
            return None
        b_step, b_f, b_r = self.best
        if b_f - f >= self.format_drop and b_r - r >= self.reward_drop:
            return (f"training collapsed: over steps {last[0][0]}-{step} the format-valid rate fell to "
                    f"{f:.2f} and the mean reward to {r:.2f}, from {b_f:.2f} and {b_r:.2f} in the best "
                    f"window (ending at step {b_step})")
        return None
