"""The central object: a rollout as segments written by the model or inserted by the environment.

Token-in, token-out: a model segment keeps the token ids exactly as the policy sampled them (never
re-tokenised: BPE boundaries drift), with their sampling logprobs; an env segment (retrieved
documents, and any protocol text the environment appends) is tokenised on its own. The loss mask
(`env_mask`) is 1 on model tokens and 0 on env tokens, and is used unchanged by SFT labels, TRL's
`env_mask` in RL and the KL term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Role = Literal["model", "env"]
FinishReason = Literal["answered", "max_retrievals", "length", "malformed"]


@dataclass
class Segment:
    """One stretch of the completion. `text` is exactly what the tokens stand for
    (`decode(token_ids)`, special tokens kept), except that a final EOS token of a model segment is
    kept in `token_ids` (the policy sampled it; RL trains on it) but not in `text`; so the rendered
    completion (`Trajectory.completion_text`) is the concatenation of segment texts."""

    role: Role
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None  # per token, model segments only

    def __post_init__(self):
        if self.role == "model" and self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError("model segment: logprobs and token_ids differ in length")


@dataclass
class Trajectory:
    question_id: str
    question: str
    protocol: str
    prompt_text: str
    prompt_ids: list[int]
    segments: list[Segment] = field(default_factory=list)
    answer: str | None = None
    finish_reason: FinishReason = "malformed"
    retrievals: int = 0
    internal_steps: int = 0
    queries: list[str] = field(default_factory=list)
    retrieved_ids: list[list[str]] = field(default_factory=list)  # passage ids per retrieval
    sample_index: int = 0
    source: str = "policy"  # which sampler / rewriter produced it

    @property
    def completion_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def env_mask(self) -> list[int]:
        return [1 if s.role == "model" else 0 for s in self.segments for _ in s.token_ids]

    @property
    def logprobs(self) -> list[float]:
        """Sampling logprobs aligned with completion_ids; 0.0 on env tokens (masked anyway)."""
        out: list[float] = []
        for s in self.segments:
            if s.role == "model" and s.logprobs is not None:
                out.extend(s.logprobs)
            else:
                out.extend([0.0] * len(s.token_ids))
        return out

    @property
    def completion_text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def model_text(self) -> str:
        return "".join(s.text for s in self.segments if s.role == "model")

    @property
    def n_model_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.role == "model")

    @property
    def n_env_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.role == "env")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        d = dict(d)
        d["segments"] = [Segment(**s) for s in d.get("segments", [])]
        return cls(**d)
