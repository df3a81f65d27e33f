"""Test and benchmark doubles for the agent loop: a scripted backend and a small in-memory retriever.

`ScriptedBackend` "generates" fixed texts tokenised by a real tokenizer, emulating stop strings,
EOS and token budgets exactly as a real backend reports them, and checks on every call that the
prompt it receives extends the rollout's original prompt token for token (token-in, token-out).

`KeywordRetriever` ranks passages by word overlap (idf-weighted), deterministic, no dependencies.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from searchrl.agent.backends import Generation, decode, encode, eos_token_ids
from searchrl.retrieval.base import Hit


class ScriptedBackend:
    """scripts: question -> list of model segments (texts). Segment k of a rollout is the one
    generated after k query-close tags in its history. A segment ending with `EOS` (the marker
    below) gets the tokenizer's EOS token appended."""

    EOS = "<<EOS>>"

    def __init__(self, tokenizer, scripts: dict[str, list[str]], query_close: str):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.query_close = query_close
        eos = tokenizer.eos_token_id
        self.eos_id = eos if eos is not None else min(eos_token_ids(tokenizer), default=None)
        self.base: dict[str, list[int]] = {}
        self.calls: list[list[list[int]]] = []

    def _question(self, text: str) -> str:
        found = [q for q in self.scripts if q in text]
        if not found:
            raise KeyError(f"no script for prompt: {text[-200:]!r}")
        return max(found, key=len)

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, seed=None):
        self.calls.append([list(p) for p in prompts])
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        out = []
        for p, budget in zip(prompts, budgets, strict=True):
            text = decode(self.tokenizer, p)
            q = self._question(text)
            if q not in self.base or (len(p) < len(self.base[q])):
                # first sight (or a shorter prompt for the same question): the original prompt
                self.base.setdefault(q, list(p))
            base = self.base[q]
            if p[: len(base)] != base:
                raise AssertionError("prompt does not extend the original prompt token for token")
            k = decode(self.tokenizer, p[len(base):]).count(self.query_close)
            seg = self.scripts[q][min(k, len(self.scripts[q]) - 1)]
            out.append(self._emit(seg, stop, budget))
        return out

    def _emit(self, seg: str, stop, budget: int) -> Generation:
        eos = seg.endswith(self.EOS)
        if eos:
            seg = seg[: -len(self.EOS)]
        ids = encode(self.tokenizer, seg)
        # first stop string: cut after the token that completes it (as a real decoder would)
        which, cut = None, None
        for n in range(1, len(ids) + 1):
            t = decode(self.tokenizer, ids[:n])
            hit = [s for s in stop if s and s in t]
            if hit:
                which = min(hit, key=lambda s: t.find(s))
                cut = n
                break
        finish = "stop" if which else ("eos" if eos else "length")
        if cut is not None:
            ids = ids[:cut]
        elif eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        if len(ids) > budget:
            ids, finish, which = ids[:budget], "length", None
        text_ids = ids[:-1] if finish == "eos" else ids
        return Generation(ids, decode(self.tokenizer, text_ids), [-0.5] * len(ids), finish, which)


_WORD = re.compile(r"[a-z0-9]+")


class KeywordRetriever:
    """Word-overlap retriever over (id, title, text) passages; idf-weighted; ties by id."""

    manifest_hash = "keyword-retriever"

    def __init__(self, passages):
        self.passages = [(str(pid), title, text) for pid, title, text in passages]
        self.docs = [Counter(_WORD.findall(f"{t} {x}".lower())) for _, t, x in self.passages]
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + n / c) for w, c in df.items()}
        self.calls: list[list[str]] = []

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        self.calls.append(list(queries))
        res = []
        for q in queries:
            words = set(_WORD.findall(q.lower()))
            scored = [(sum(self.idf.get(w, 0.0) for w in words if w in d), i) for i, d in enumerate(self.docs)]
            scored.sort(key=lambda x: (-x[0], self.passages[x[1]][0]))
            res.append([Hit(self.passages[i][0], self.passages[i][1], self.passages[i][2], float(s))
                        for s, i in scored[:k]])
        return res
