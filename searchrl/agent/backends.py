"""Text generation backends for the search agent: token ids in, sampled token ids + logprobs out.

Every backend implements one call, `generate(prompts, max_new_tokens=..., stop=..., temperature=...,
top_p=..., seed=...) -> list[Generation]`, over *token-id* prompts. The rollout engine never
decodes-and-re-encodes history: it hands back `prompt_ids + completion ids so far` on every turn.

- `HFBackend`: transformers on CPU or CUDA with our own continuous-batching decode loop (left padding,
  a KV cache that grows in place, per-row stop strings, finished rows leave the batch and waiting
  requests take their place; `generate_stream` lets a finished request come back with more tokens
  appended, e.g. retrieved documents). Greedy when temperature == 0.
- `VLLMBackend`: offline `vllm.LLM` (GPU). `import vllm` happens only inside it.

`Generation.token_ids` are exactly the sampled tokens: they include every token of a matched stop
string (and possibly a few characters after it, when the last token runs past the stop string's end)
and the final EOS token if one was sampled. `Generation.text` is the decode of those ids without
the final EOS, so `text` always agrees with the tokens (vLLM's own `.text`, which is cut at the stop
string, is not used).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

# Special tokens that end a turn in the chat models we care about (Qwen, Llama-3, SmolLM, GPT-2).
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")


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


# ----------------------------------------------------------------------------- tokenizer helpers
def decode(tokenizer, ids: list[int]) -> str:
    """Decode exactly (special tokens kept, no clean-up of spaces): the text the tokens stand for."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode(tokenizer, text: str) -> list[int]:
    """Tokenise a piece of text on its own (no BOS/EOS added)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def eos_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS, the generation config's EOS list, and the
    usual end-of-turn special tokens (<|im_end|>, <|endoftext|>, <|eot_id|>, ...) when the vocabulary
    has them as special tokens."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in _END_TOKENS:
        if tok in special:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0:
                ids.add(tid)
    return ids


def chat_prompt_ids(tokenizer, system: str | None, user: str, assistant_prefix: str = "") -> list[int]:
    """Token ids of a one-turn chat prompt ending where the assistant starts writing.

    Uses the tokenizer's chat template (generation prompt added); `assistant_prefix` (e.g. "<think>")
    is appended to the rendered text before tokenising. A tokenizer without a chat template (a base
    model) gets the plain "System / User: ... / Assistant:" layout of R1-Searcher's base prompt.
    `system=None` keeps the template's default system message (if it has one).
    """
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (f"{system}\n\n" if system else "") + f"User: {user}\nAssistant:"
        if assistant_prefix and not assistant_prefix.startswith((" ", "\n")):
            text += " "
    return encode(tokenizer, text + assistant_prefix)


# ----------------------------------------------------------------------------- stop strings
class _StopWatcher:
    """Finds the first stop string in a row's generated text, decoding only a short tail window.

    A stop string first appears at the step that completes it, and the token that completes it is in
    the last `window` tokens (each token adds at least one character of an ASCII stop string), so
    checking `decode(tail)` each step is exact and O(1) per token.
    """

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...]):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.window = max((len(s) for s in self.stops), default=0) + 3

    def match(self, ids: list[int]) -> str | None:
        if not self.stops:
            return None
        tail = decode(self.tok, ids[-self.window:])
        best, pos = None, None
        for s in self.stops:
            i = tail.find(s)
            if i >= 0 and (pos is None or i < pos):
                best, pos = s, i
        return best


StopWatcher = _StopWatcher  # public name (other stages use it for their own decode loops)


# ----------------------------------------------------------------------------- HF backend
_BLOCK = 16  # prefix-cache granularity (tokens)


def _grow_cache(n_layers: int, capacity: int):
    """A DynamicCache whose layers write into preallocated buffers (no torch.cat per step: with 32 rows
    x 400 tokens the concatenating cache copies ~0.5 GB per decode step on SmolLM2), can start from
    reused prefix KV, and can drop rows and leading padding columns cheaply."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    class GrowLayer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.n = 0
            self.kbuf = self.vbuf = None

        def _reserve(self, need: int, k, v):
            if self.kbuf is not None and need <= self.kbuf.shape[-2]:
                return
            cap = max(need, capacity, 2 * (self.kbuf.shape[-2] if self.kbuf is not None else 0))
            kb = k.new_empty((*k.shape[:-2], cap, k.shape[-1]))
            vb = v.new_empty((*v.shape[:-2], cap, v.shape[-1]))
            if self.n:
                kb[..., : self.n, :] = self.kbuf[..., : self.n, :]
                vb[..., : self.n, :] = self.vbuf[..., : self.n, :]
            self.kbuf, self.vbuf = kb, vb

        def _views(self):
            self.keys, self.values = self.kbuf[..., : self.n, :], self.vbuf[..., : self.n, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            self._reserve(self.n + q, key_states, value_states)
            self.kbuf[..., self.n: self.n + q, :] = key_states
            self.vbuf[..., self.n: self.n + q, :] = value_states
            self.n += q
            self._views()
            return self.keys, self.values

        def load(self, rows, P: int):
            """Start from reused KV: rows[j] = (K [H, >=c, D], V, c) or None; right-aligned at P, zeros
            in front (masked out; zeros, not garbage, so 0-weight x value stays 0)."""
            ref = next(r for r in rows if r is not None)
            k0, v0 = ref[0], ref[1]
            B, (H, _, D) = len(rows), k0.shape
            self.lazy_initialization(k0, v0)
            cap = max(P, capacity)
            self.kbuf = k0.new_empty((B, H, cap, D))
            self.vbuf = v0.new_empty((B, H, cap, D))
            same = all(r is not None and r[0] is k0 and r[2] == P for r in rows)
            if same:  # one shared prefix (round 1): a single broadcast copy
                self.kbuf[:, :, :P] = k0[None, :, :P]
                self.vbuf[:, :, :P] = v0[None, :, :P]
            else:
                for j, r in enumerate(rows):
                    c = 0 if r is None else r[2]
                    if c < P:
                        self.kbuf[j, :, : P - c].zero_()
                        self.vbuf[j, :, : P - c].zero_()
                    if c:
                        self.kbuf[j, :, P - c: P] = r[0][:, :c]
                        self.vbuf[j, :, P - c: P] = r[1][:, :c]
            self.n = P
            self._views()

        def get_seq_length(self) -> int:
            return self.n

        def move_rows(self, moves: list[tuple[int, int]], k: int) -> None:
            """Copy row src into row dst for each (dst, src), then keep the first k rows: in place, only
            the filled columns of the rows that move (no new buffer, no page faults on fresh memory)."""
            for dst, src in moves:
                self.kbuf[dst, :, : self.n] = self.kbuf[src, :, : self.n]
                self.vbuf[dst, :, : self.n] = self.vbuf[src, :, : self.n]
            self.kbuf, self.vbuf = self.kbuf[:k], self.vbuf[:k]
            self._views()

        def drop_leading(self, m: int) -> None:
            """Forget the first m positions (padding every remaining row shares)."""
            if self.kbuf is not None and m > 0:
                self.kbuf, self.vbuf = self.kbuf[..., m:, :], self.vbuf[..., m:, :]
                self.n -= m
                self._views()

        def row(self, j: int, cols):
            """KV of batch row j at columns `cols` (a LongTensor), as contiguous [H, len, D]."""
            return (self.kbuf[j].index_select(-2, cols).contiguous(),
                    self.vbuf[j].index_select(-2, cols).contiguous())

        def concat_from(self, a, b, capacity: int) -> None:
            """Rows of layer a, then rows of layer b, both right-aligned at max(a.n, b.n) columns with
            zeros in front (masked out)."""
            N = max(a.n, b.n)
            self.lazy_initialization(a.kbuf, a.vbuf)
            Ba = a.kbuf.shape[0]
            shape = (Ba + b.kbuf.shape[0], a.kbuf.shape[1], max(N, capacity), a.kbuf.shape[3])
            self.kbuf, self.vbuf = a.kbuf.new_empty(shape), a.vbuf.new_empty(shape)
            for buf, src_a, src_b in ((self.kbuf, a.kbuf, b.kbuf), (self.vbuf, a.vbuf, b.vbuf)):
                buf[:Ba, :, : N - a.n].zero_()
                buf[:Ba, :, N - a.n: N] = src_a[..., : a.n, :]
                buf[Ba:, :, : N - b.n].zero_()
                buf[Ba:, :, N - b.n: N] = src_b[..., : b.n, :]
            self.n = N
            self._views()

    class GrowCache(DynamicCache):
        def __init__(self):
            Cache.__init__(self, layers=[GrowLayer() for _ in range(n_layers)])

        def drop_leading(self, m: int) -> None:
            for layer in self.layers:
                layer.drop_leading(m)

        def keep_rows(self, keep: list[int]) -> list[int]:
            """Keep rows `keep`; each dropped row among the first len(keep) is filled with a kept row from
            the end (the fewest copies). Returns the old index of each new row."""
            k = len(keep)
            holes = sorted(set(range(k)) - set(keep))
            moves = list(zip(holes, [j for j in keep if j >= k], strict=True))
            for layer in self.layers:
                layer.move_rows(moves, k)
            order = list(range(k))
            for dst, src in moves:
                order[dst] = src
            return order

        def concat(self, other, capacity: int):
            out = GrowCache()
            for c, a, b in zip(out.layers, self.layers, other.layers, strict=True):
                c.concat_from(a, b, capacity)
            return out

    return GrowCache()


@dataclass
class _Row:
    key: Any  # the caller's request key
    prompt: list[int]
    budget: int
    ids: list[int] = field(default_factory=list)  # sampled so far
    lps: list[float] = field(default_factory=list)


class _Batch:
    """The rows being decoded together: their KV cache (rows right-aligned, padding masked), attention
    mask, next position ids and the logits each row's next token is sampled from."""

    def __init__(self, backend, cache, attn, next_pos, logits, rows: list[_Row]):
        self.backend, self.cache, self.attn, self.next_pos, self.logits, self.rows = (
            backend, cache, attn, next_pos, logits, rows)

    def row_kv(self, j: int):
        cols = self.attn[j].nonzero()[:, 0]
        return [layer.row(j, cols) for layer in self.cache.layers]

    def select(self, keep: list[int]):
        """Keep only rows `keep` (their order may change: returns the old index of each new row as a
        tensor), and cut the padding columns every remaining row has in front."""
        import torch

        order = self.cache.keep_rows(keep)
        sel = torch.tensor(order, dtype=torch.long, device=self.attn.device)
        self.attn, self.next_pos = self.attn[sel], self.next_pos[sel]
        self.rows = [self.rows[j] for j in order]
        lead = int((self.attn.cumsum(-1) == 0).sum(-1).min().item())
        if lead > 0:
            self.cache.drop_leading(lead)
            self.attn = self.attn[:, lead:]
        return sel

    def step(self, tok) -> None:
        """Run each row's sampled token; the logits for the next one replace self.logits."""
        import torch

        self.attn = torch.cat([self.attn, self.attn.new_ones((self.attn.shape[0], 1))], dim=-1)
        self.logits = self.backend._forward(input_ids=tok[:, None], attention_mask=self.attn,
                                            position_ids=self.next_pos[:, None], past_key_values=self.cache)
        self.next_pos = self.next_pos + 1

    def concat(self, other: _Batch) -> _Batch:
        """This batch's rows, then other's (one copy of both caches)."""
        import torch

        na, nb = self.attn.shape[1], other.attn.shape[1]
        N = max(na, nb)
        rows = self.rows + other.rows
        cache = self.cache.concat(other.cache, N + max(r.budget - len(r.ids) for r in rows) + 1)
        attn = self.attn.new_zeros((len(rows), N))
        attn[: len(self.rows), N - na:] = self.attn
        attn[len(self.rows):, N - nb:] = other.attn
        return _Batch(self.backend, cache, attn, torch.cat([self.next_pos, other.next_pos]),
                      torch.cat([self.logits, other.logits]), rows)


class _Entry:
    __slots__ = ("seq", "kv", "keys", "nbytes", "shared")

    def __init__(self, seq: list[int], kv: list[tuple[Any, Any]], shared: bool = False):
        self.seq = seq
        self.shared = shared  # a common prompt prefix (kept), not one rollout's history
        self.kv = kv  # per layer (K [H, len, D], V [H, len, D]) for seq
        self.keys: list[int] = []
        self.nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)


class _PrefixStore:
    """KV of token sequences already run through the model, found again by longest shared prefix
    (block-hash chain over 16-token blocks, then an exact comparison). LRU within a byte budget.

    Only valid while the weights do not change: HFBackend keeps one per `generate` call (shared
    system prompt), or one per `session()` (the engine's rounds: the next prompt of a rollout extends
    the sequence it just generated, so only the new env tokens need a forward pass)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.index: dict[int, _Entry] = {}
        self.entries: dict[int, _Entry] = {}  # id(entry) -> entry, insertion order = LRU order
        self.bytes = 0
        self.hits = self.hit_tokens = self.lookups = 0

    @staticmethod
    def _chain(seq: list[int], nblocks: int):
        h = 0
        for k in range(nblocks):
            h = hash((h, tuple(seq[k * _BLOCK:(k + 1) * _BLOCK])))
            yield h

    def add(self, seq: list[int], kv, shared: bool = False) -> _Entry | None:
        if len(seq) < _BLOCK:
            return None
        e = _Entry(list(seq), kv, shared)
        if e.nbytes > self.max_bytes:
            return None
        for h in self._chain(seq, len(seq) // _BLOCK):
            self.index[h] = e
            e.keys.append(h)
        self.entries[id(e)] = e
        self.bytes += e.nbytes
        while self.bytes > self.max_bytes and self.entries:
            self.drop(next(iter(self.entries.values())))
        return e

    def drop(self, e: _Entry) -> None:
        if self.entries.pop(id(e), None) is None:
            return
        self.bytes -= e.nbytes
        for h in e.keys:
            if self.index.get(h) is e:
                del self.index[h]

    def lookup(self, p: list[int]) -> tuple[_Entry | None, int]:
        """(entry, c): the first c tokens of p have their KV in entry (c <= len(p) - 1)."""
        self.lookups += 1
        best = None
        nb = 0
        for k, h in enumerate(self._chain(p, (len(p) - 1) // _BLOCK)):
            e = self.index.get(h)
            if e is None:
                break
            best, nb = e, k + 1
        if best is None or best.seq[: nb * _BLOCK] != p[: nb * _BLOCK]:
            return None, 0
        c = nb * _BLOCK
        lim = min(len(best.seq), len(p) - 1)
        while c < lim and best.seq[c] == p[c]:
            c += 1
        self.entries[id(best)] = self.entries.pop(id(best))  # most recently used
        self.hits += 1
        self.hit_tokens += c
        return best, c


class HFBackend:
    """transformers model + our own continuous-batching decode loop.

    Requests wait in a queue (sorted by prompt length, so rows decoded together pad little); up to
    `batch_size` rows decode together, one token per row per step. A row that samples an EOS token,
    completes a stop string or reaches its token budget leaves the batch at once (its KV row is
    overwritten by a row from the end, and padding columns no remaining row needs are cut), and
    waiting requests take the free rows: they are prefilled together (logits of the last position
    only) in a batch of their own, which is then appended to the running batch (rows right-aligned,
    padding in front). `generate_stream`'s callback can put a finished request back at the head of
    the queue with more tokens appended (the rollout engine's retrieved documents), so no row ever
    waits for the slowest one. Why it matters on a CPU: a decode step costs about as much with 4 rows
    as with 16 (small-matrix GEMMs), so what counts is keeping rows busy.

    Prefix KV reuse: a prompt prefix whose KV is already known is not run again. The common prefix
    of the prompts admitted together (the system prompt) is run once; inside `with backend.session():`
    (the rollout engine opens one per `run_rollouts`) the KV of every row that stopped on a stop string
    is kept, so its continuation only runs the inserted document tokens. Rows then have two padding
    gaps ([pad | reused KV | pad | new tokens]); the attention mask and explicit position ids make
    that exact. Sessions must not span a weight update (the engine's do not).
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, kv_reuse: bool = True,
                 session_max_bytes: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.kv_reuse = kv_reuse
        self.session_max_bytes = session_max_bytes
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self._n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        # decode_steps: forward passes that each sample one token for every row still in the batch,
        # so generated_tokens / decode_steps is the mean batch occupancy.
        self.stats = {"calls": 0, "generated_tokens": 0, "prompt_tokens": 0, "prefill_tokens": 0,
                      "reused_tokens": 0, "decode_steps": 0, "seconds": 0.0}
        self._session: _PrefixStore | None = None
        self._continue_stops: set[str] | None = None

    @classmethod
    def load(cls, name: str, dtype: str = "float32", device: str = "auto", batch_size: int = 32,
             **kw) -> HFBackend:
        from searchrl.models import load_causal_lm

        model, tok = load_causal_lm(name, dtype=dtype, device=device)
        return cls(model, tok, batch_size=batch_size, **kw)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _default_store_bytes(self) -> int:
        if self.session_max_bytes is not None:
            return int(self.session_max_bytes)
        return (8 << 30) if self.device.type == "cuda" else (3 << 30)

    @contextmanager
    def session(self, continue_stops: list[str] | tuple[str, ...] | None = None):
        """Keep prefix KV across `generate` calls (same weights throughout). Only rows that stop on one
        of `continue_stops` (default: any stop string) are kept: those are the ones continued later."""
        if not self.kv_reuse or self._session is not None:
            yield self
            return
        self._session = _PrefixStore(self._default_store_bytes())
        self._continue_stops = set(continue_stops) if continue_stops else None
        try:
            yield self
        finally:
            self._session = None
            self._continue_stops = None

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], stop: list[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)

        def collect(done):
            for i, g in done:
                out[i] = g
            return []

        self.generate_stream(prompts, max_new_tokens=max_new_tokens, stop=stop, temperature=temperature,
                             top_p=top_p, seed=seed, on_finish=collect)
        return out  # type: ignore[return-value]

    def generate_stream(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], on_finish,
                        stop: list[str] = (), temperature: float = 0.0, top_p: float = 1.0,
                        seed: int | None = None) -> None:
        """Continuous batching. Request i is `prompts[i]`; when rows finish at a decode step,
        `on_finish([(i, Generation), ...])` is called once with all of them and returns
        `[(i, next_prompt_ids, budget), ...]`: requests that continue (e.g. the rollout with its
        documents inserted). Those are admitted ahead of prompts not started yet, as soon as the
        batch has room, while the other rows keep decoding."""
        import torch

        n = len(prompts)
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
        if len(budgets) != n:
            raise ValueError(f"max_new_tokens: {len(budgets)} budgets for {n} prompts")
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        store = self._session
        if store is None and self.kv_reuse:
            store = _PrefixStore(self._default_store_bytes())
        order = sorted(range(n), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
        waiting = deque((i, prompts[i], budgets[i]) for i in order)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._decode(waiting, _StopWatcher(self.tokenizer, list(stop)), float(temperature), float(top_p), gen,
                         store, on_finish)
        self.stats["calls"] += 1
        self.stats["seconds"] += time.perf_counter() - t0

    def _decode(self, waiting: deque, watcher, temperature, top_p, gen, store, on_finish) -> None:
        """The decode loop: admit waiting requests into free rows (one prefill forward for all of them,
        then one copy that appends them to the running batch), sample one token per row, report the
        rows that finished, drop them, run one decode forward for the rest."""

        batch: _Batch | None = None
        while waiting or batch is not None:
            room = self.batch_size - (len(batch.rows) if batch is not None else 0)
            if waiting and room > 0:
                reqs = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                if any(len(p) == 0 for _, p, _ in reqs):
                    raise ValueError("generate: empty prompt (every prompt needs at least one token)")
                self.stats["prompt_tokens"] += sum(len(p) for _, p, _ in reqs)
                empty = [(k, Generation([], "", [], "length", None)) for k, _, b in reqs if b <= 0]
                if empty:
                    waiting.extendleft(reversed(on_finish(empty)))
                reqs = [r for r in reqs if r[2] > 0]
                if reqs:
                    new = self._prefill(reqs, store)
                    batch = new if batch is None else batch.concat(new)
            if batch is None:
                continue
            self.stats["decode_steps"] += 1
            tok, lp = self._sample(batch.logits, temperature, top_p, gen)
            tok_l, lp_l = tok.tolist(), lp.tolist()
            keep, done = [], []
            for j, row in enumerate(batch.rows):
                t = tok_l[j]
                row.ids.append(t)
                row.lps.append(lp_l[j])
                finish, which = None, None
                if t in self.eos_ids:
                    finish = "eos"
                else:
                    which = watcher.match(row.ids)
                    if which is not None:
                        finish = "stop"
                    elif len(row.ids) >= row.budget:
                        finish = "length"
                if finish is None:
                    keep.append(j)
                    continue
                text_ids = row.ids[:-1] if finish == "eos" else row.ids
                done.append((row.key, Generation(list(row.ids), decode(self.tokenizer, text_ids), row.lps,
                                                 finish, which)))
                self.stats["generated_tokens"] += len(row.ids)
                if finish == "stop" and self._session is not None and (
                        self._continue_stops is None or which in self._continue_stops):
                    # KV of prompt + ids[:-1] (the last sampled token has not been run yet)
                    store.add(row.prompt + row.ids[:-1], batch.row_kv(j))
            if done:
                waiting.extendleft(reversed(on_finish(done)))  # continuations go first
            if not keep:
                batch = None
                continue
            if len(keep) < len(batch.rows):
                tok = tok[batch.select(keep)]
            batch.step(tok)

    def _forward(self, **kw):
        return self.model(use_cache=True, logits_to_keep=1, **kw).logits[:, -1, :]

    def _shared_prefix(self, prompts, store: _PrefixStore):
        """Run the common prompt prefix of a group of new prompts once (batch 1) and register it."""
        import torch
        from transformers.cache_utils import DynamicCache

        lcp = len(prompts[0])
        for p in prompts[1:]:
            m = min(lcp, len(p))
            k = 0
            while k < m and p[k] == prompts[0][k]:
                k += 1
            lcp = k
        lcp = min(lcp, min(len(p) for p in prompts) - 1)
        if lcp < 2 * _BLOCK:
            return
        ids = torch.tensor([prompts[0][:lcp]], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        self.model(input_ids=ids, position_ids=torch.arange(lcp, device=self.device)[None], past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        self.stats["prefill_tokens"] += lcp
        kv = [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in cache.layers]
        store.add(prompts[0][:lcp], kv, shared=True)

    def _prefill(self, reqs, store) -> _Batch:
        """One left-padded forward over the requests' prompts, starting from any KV the store has for a
        prefix of each (rows are then [pad | reused KV | pad | new tokens]; mask + positions make it exact)."""
        import torch

        dev = self.device
        prompts = [p for _, p, _ in reqs]
        hits: list[tuple[_Entry | None, int]] = [(None, 0)] * len(reqs)
        if store is not None:
            hits = [store.lookup(p) for p in prompts]
            if len(reqs) > 1 and all(c == 0 for _, c in hits):
                self._shared_prefix(prompts, store)
                hits = [store.lookup(p) for p in prompts]
        P = max(c for _, c in hits)
        S = max(len(p) - c for p, (_, c) in zip(prompts, hits, strict=True))
        B = len(reqs)
        inp = torch.full((B, S), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + S), dtype=torch.long)
        pos = torch.zeros((B, S), dtype=torch.long)
        for j, (p, (_, c)) in enumerate(zip(prompts, hits, strict=True)):
            suffix = p[c:]
            inp[j, S - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
            attn[j, P - c: P] = 1
            attn[j, P + S - len(suffix):] = 1
            pos[j, S - len(suffix):] = torch.arange(c, c + len(suffix))
        inp, attn, pos = inp.to(dev), attn.to(dev), pos.to(dev)
        cache = _grow_cache(self._n_layers, P + S + max(b for _, _, b in reqs))
        if P > 0:
            for li, layer in enumerate(cache.layers):
                layer.load([(e.kv[li][0], e.kv[li][1], c) if e is not None and c > 0 else None for e, c in hits], P)
            if self._session is not None:  # a fully reused history is not needed again
                for e, c in hits:
                    if e is not None and not e.shared and c == len(e.seq):
                        store.drop(e)
        self.stats["prefill_tokens"] += int(sum(len(p) - c for p, (_, c) in zip(prompts, hits, strict=True)))
        self.stats["reused_tokens"] += int(sum(c for _, c in hits))
        logits = self._forward(input_ids=inp, attention_mask=attn, position_ids=pos, past_key_values=cache)
        rows = [_Row(k, list(p), b) for k, p, b in reqs]  # own copy: callers extend their histories
        return _Batch(self, cache, attn, pos[:, -1] + 1, logits, rows)

    @staticmethod
    def _sample(logits, temperature: float, top_p: float, gen):
        """Returns (token, logprob of token under the distribution sampled from)."""
        import torch

        logits = logits.float()
        if temperature <= 0:
            tok = logits.argmax(-1)
            lp = logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
            return tok, lp
        logits = logits / temperature
        if top_p < 1.0:
            sorted_logits, sorted_idx = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            cum = probs.cumsum(-1)
            drop = (cum - probs) >= top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
        logp = torch.log_softmax(logits, -1)
        tok = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
        return tok, logp.gather(-1, tok[:, None])[:, 0]


# ----------------------------------------------------------------------------- vLLM backend
class VLLMBackend:
    """Offline vLLM (0.3x, V1 engine) over token prompts. GPU machines only.

    Logprobs are requested with `logprobs=0` (the sampled token only) from an engine built with
    `logprobs_mode="processed_logprobs"`, i.e. after temperature / top-p, the distribution actually
    sampled from (as TRL does). Automatic prefix caching (on by default) makes the engine's
    `prompt + completion so far` re-submission each turn cheap.
    """

    def __init__(self, model_path: str, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 seed: int = 0, max_model_len: int | None = None, llm=None, tokenizer=None):
        if llm is None:
            try:
                from vllm import LLM
            except ImportError as err:
                from searchrl.errors import SearchRLError

                raise SearchRLError(
                    "agent.backend=vllm needs vLLM, which is not installed here (GPU machines only: "
                    "pip install 'searchrl[gpu]'). On CPU set agent.backend=hf.") from err
            llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                      max_model_len=max_model_len, logprobs_mode="processed_logprobs")
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        self.eos_ids = eos_token_ids(self.tokenizer)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], stop: list[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        from vllm import SamplingParams

        n = len(prompts)
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
        params = [SamplingParams(max_tokens=max(1, b), temperature=float(temperature),
                                 top_p=float(top_p) if temperature > 0 else 1.0,
                                 seed=None if seed is None else int(seed) + i, stop=list(stop) or None,
                                 stop_token_ids=sorted(self.eos_ids), include_stop_str_in_output=True,
                                 logprobs=0, skip_special_tokens=False, detokenize=True)
                  for i, b in enumerate(budgets)]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        res = []
        for p_out, b in zip(outs, budgets, strict=True):
            o = p_out.outputs[0]
            ids = list(o.token_ids)
            lps = [float(d[t].logprob) if d is not None and t in d else 0.0
                   for t, d in zip(ids, o.logprobs or [None] * len(ids), strict=False)]
            if b <= 0:
                ids, lps = [], []
            if o.finish_reason == "length" or b <= 0:
                finish, which = "length", None
            elif isinstance(o.stop_reason, str):
                finish, which = "stop", o.stop_reason
            else:  # EOS or a stop token id
                finish, which = "eos", None
            ends_eos = bool(ids) and ids[-1] in self.eos_ids
            text_ids = ids[:-1] if finish == "eos" and ends_eos else ids
            res.append(Generation(ids, decode(self.tokenizer, text_ids), lps, finish, which))
        return res


# ----------------------------------------------------------------------------- factory + helpers
def make_backend(policy_cfg, agent_cfg, model=None, tokenizer=None) -> Backend:
    """Build the backend named by `agent_cfg.backend`.

    `model` lets RL pass its live policy (a transformers model; its tokenizer via `tokenizer`, else
    loaded from `policy_cfg.model`), or an already built `vllm.LLM`.
    """
    from searchrl.models import causal_lm_path, load_tokenizer

    if agent_cfg.backend == "hf":
        if model is None:
            return HFBackend.load(policy_cfg.model, dtype=policy_cfg.dtype, device=policy_cfg.device,
                                  batch_size=agent_cfg.batch_size, kv_reuse=getattr(agent_cfg, "kv_reuse", True))
        tok = tokenizer if tokenizer is not None else load_tokenizer(policy_cfg.model)
        return HFBackend(model, tok, batch_size=agent_cfg.batch_size, kv_reuse=getattr(agent_cfg, "kv_reuse", True))
    if agent_cfg.backend == "vllm":
        if model is not None:
            return VLLMBackend("", llm=model, tokenizer=tokenizer)
        return VLLMBackend(causal_lm_path(policy_cfg.model), dtype=policy_cfg.dtype,
                           gpu_memory_utilization=agent_cfg.vllm_gpu_memory_utilization,
                           max_model_len=getattr(agent_cfg, "vllm_max_model_len", None) or None)
    raise ValueError(f"agent.backend: unknown backend '{agent_cfg.backend}' (hf | vllm)")


CLOSED_BOOK_SYSTEM = ("Answer the question from your own knowledge. Reply with the answer only: a few words, "
                      "no explanation, no full sentence.")


def clean_short_answer(text: str) -> str:
    """First non-empty line, without an 'Answer:' lead-in or wrapping quotes / trailing full stop."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    for lead in ("final answer:", "answer:", "a:"):
        if line.lower().startswith(lead):
            line = line[len(lead):].strip()
    line = line.strip().strip('"').strip("'").strip()
    if line.endswith(".") and not line.endswith(".."):
        line = line[:-1].rstrip()
    return line


def answer_closed_book(backend: Backend, questions: list[str], max_new_tokens: int = 32,
                       batch_size: int = 32) -> list[str]:
    """Greedy short answers without retrieval (the prepare-stage knowledge probe and the 'direct' baseline)."""
    tok = backend.tokenizer
    answers: list[str] = []
    for s in range(0, len(questions), batch_size):
        prompts = [chat_prompt_ids(tok, CLOSED_BOOK_SYSTEM, q) for q in questions[s: s + batch_size]]
        gens = backend.generate(prompts, max_new_tokens=max_new_tokens, stop=["\n\n"], temperature=0.0)
        answers.extend(clean_short_answer(g.text) for g in gens)
    return answers
