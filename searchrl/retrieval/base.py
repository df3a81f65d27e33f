"""What every retriever returns and accepts, so the agent loop does not care which index is behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    text: str
    score: float


class Retriever(Protocol):
    manifest_hash: str  # identifies corpus + encoder + index settings (retrieval cache key)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """One batched call: k hits per query, best first."""
        ...
