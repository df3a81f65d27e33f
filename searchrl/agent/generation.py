"""What every generation backend returns, and how a generation ends on a stop string.

Every backend implements one call, `generate(prompts, max_new_tokens=..., stop=..., temperature=...,
top_p=..., seed=...) -> list[Generation]`, over *token-id* prompts (searchrl/agent/backends.py lists
them and builds one from the config).

`Generation.token_ids` are exactly the sampled tokens: they include every token of a matched stop
string (and possibly a few characters after it, when the last token runs past the stop string's end)
and the final EOS token if one was sampled. `Generation.text` is the decode of those ids without
the final EOS, so `text` always agrees with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from searchrl.agent.tokens import decode


@dataclass
class Generation:
    token_ids: list[int]  # exactly as sampled (includes the stop string's tokens and a final EOS if produced)
    text: str  # decode of token_ids without the EOS special token
    logprobs: list[float]  # sampling logprob of each token (of the distribution actually sampled from)
    finish: str  # "stop" | "eos" | "length"
    stop: str | None = None  # which stop string matched


@runtime_checkable
class Backend(Protocol):
    tokenizer: Any

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], stop: list[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]: ...


class StopWatcher:
    """Finds the first stop string in a row's generated text, decoding only a short tail window.

    A stop string first appears at the step that completes it, and the token that completes it is in
    the last `window` tokens (each token adds at least one character of an ASCII stop string), so
    checking `decode(tail)` each step is exact and O(1) per token.

    Most steps cannot complete any stop string: when every stop string ends in a printable ASCII
    character, the token that completes one contains that character's byte, and the decode of that
    token on its own shows it (an ASCII byte decodes as itself whatever bytes surround it). `match`
    therefore first looks the last token's own text up (cached per token id) and decodes the tail
    only when it holds one of those final characters: the same answers, about one dictionary lookup
    per row per step instead of a tokenizer call (it matters on a GPU, where a 128-row step takes a
    few milliseconds). Stop strings ending in whitespace or non-ASCII text are always checked in full
    (a SentencePiece token's leading space is not in its lone decode).
    """

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...]):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.window = max((len(s) for s in self.stops), default=0) + 3
        last = {s[-1] for s in self.stops}
        self._finals = "".join(sorted(last)) if all(c.isascii() and c.isprintable() and not c.isspace()
                                                     for c in last) else None
        self._pieces: dict[int, bool] = {}  # token id -> its text holds a final character

    def _may_complete(self, token_id: int) -> bool:
        hit = self._pieces.get(token_id)
        if hit is None:
            piece = decode(self.tok, [token_id])
            hit = self._pieces[token_id] = any(c in piece for c in self._finals)
        return hit

    def match(self, ids: list[int]) -> str | None:
        if not self.stops or not ids:
            return None
        if self._finals is not None and not self._may_complete(ids[-1]):
            return None
        tail = decode(self.tok, ids[-self.window:])
        best, pos = None, None
        for s in self.stops:
            i = tail.find(s)
            if i >= 0 and (pos is None or i < pos):
                best, pos = s, i
        return best
