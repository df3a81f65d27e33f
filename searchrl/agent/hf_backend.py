"""HFBackend: a transformers causal LM with our own continuous-batching decode loop (CPU or CUDA).

Why our own loop and not transformers' (5.17): `generate` decodes one fixed batch to the end (a
row that stops early keeps its place; nothing can join), and its continuous-batching
`generate_batch` / `ContinuousBatchingManager` has no per-request stop strings and no way to hand a
finished request back with tokens appended while reusing its KV. `StaticCache` writes every row at
one shared position, so rows of different lengths cannot share it. What we take from transformers
is the model, its attention interface (searchrl/agent/attention.py) and its `Cache` protocol
(searchrl/agent/kv_cache.py).

The loop (`HFBackend._decode`), one iteration per decode step:
1. sample one token per row (greedy when temperature == 0);
2. a row that sampled EOS, completed a stop string or used its budget leaves: it is reported through
   `on_finish`, which may hand it back with more tokens appended (the rollout engine's documents);
   the last rows move into the freed slots;
3. one forward: if waiting requests fit into free rows, they are admitted (reused prefix KV copied
   into their slots, the rest of their prompts left-padded) and run in the same forward as the
   remaining rows' sampled tokens (`_prefill`: one packed sequence, attention per group); otherwise a
   plain decode step for the remaining rows (`DecodeStep`). The logits of each row's last position
   are the next iteration's.

`DecodeStep` has two modes, the same arithmetic:
- "dynamic" (CPU default): exactly the rows in use, attention over the longest row's columns;
- "static" (CUDA default): fixed shapes, i.e. the rows in use rounded up to a power of two (idle
  rows compute on a harmless dummy token) and attention over the cache's whole width, so that each
  row-count bucket is captured once as a CUDA graph and then replayed: one launch per step instead
  of ~15 kernel launches per layer (a plain 135M decode step took 71 ms of launches on the H200 of
  issue 13). On a CPU the static mode runs the same code eagerly, which is how its tokens are tested.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from searchrl.agent.attention import gqa_attention
from searchrl.agent.generation import Generation, StopWatcher
from searchrl.agent.kv_cache import BLOCK, PrefixEntry, PrefixStore, SlotCache
from searchrl.agent.tokens import decode, eos_token_ids

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "dynamic", "static")


@dataclass
class Row:
    key: Any  # the caller's request key
    prompt: list[int]
    budget: int
    pos: int = 0  # tokens whose KV is in the row's slot = position (and column) of the next token run
    ids: list[int] = field(default_factory=list)  # sampled so far
    lps: list[float] = field(default_factory=list)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@contextmanager
def vocab_projection_by_rows(model):
    """On CPU, while decoding: the output projection of a batch of more than one row as W @ x^T
    instead of x @ W^T (one row keeps F.linear: a matrix-vector product either way).

    The vocabulary projection is the one matrix much wider than deep (49,152 x 576 in SmolLM2, 21% of
    its weights) and it runs on a handful of rows per decode step. MKL's sgemm for x @ W^T with 2-32
    rows streams W about twice over; as W @ x^T it reads W once, like the one-row product. Measured
    on this project's CPU (2 EPYC cores, MKL 2024.2, torch 2.13, SmolLM2's projection, best of runs):
    2 rows 16.9 -> 2.6 ms, 4 rows 13.1 -> 2.6 ms, 8 rows 12.6 -> 5.9 ms, 16 rows 13.2 -> 11.0 ms,
    32 rows 20.0 -> 15.3 ms; 1 row 7.2 ms both ways. The same change on the layers' small matrices
    wins or loses by row count, so it is not made there. Same dot products, summed in another order:
    logits agree to float rounding (the rollout benchmark's trajectories are token-identical).
    Models whose output layer is not a plain bias-free nn.Linear (hooks, adapters) are left alone."""
    import torch
    import torch.nn.functional as F

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (head is None or type(head) is not torch.nn.Linear or head.bias is not None or "forward" in vars(head)
            or hasattr(head, "_hf_hook") or next(head.parameters()).device.type != "cpu"):
        yield
        return

    def forward(x):
        rows = x.numel() // x.shape[-1]
        if rows < 2:
            return F.linear(x, head.weight)
        y = torch.mm(head.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
        return y.reshape(*x.shape[:-1], head.weight.shape[0])

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


class DecodeStep:
    """One decode forward over rows 0..b-1 of a SlotCache: token tok[j] at position pos[j] of row j,
    written to column pos[j] of slot j, attending to columns 0..pos[j]. Returns logits [b, vocab].

    static=False: shapes follow the batch (b rows, max(pos)+1 columns). static=True: b is rounded up
    to a bucket (a power of two, at most the cache's rows) and attention spans the cache's width;
    rows past b run the pad token at position 0 of their (free) slot. With graphs=True (CUDA) each
    bucket's forward is captured once as a CUDA graph on its first use, with the real step's inputs
    already in the static buffers (the two warm-up runs and the replay write the same KV), and
    replayed afterwards; a failed capture is logged once and the step runs eagerly from then on.
    """

    def __init__(self, backend: HFBackend, cache: SlotCache, static: bool, graphs: bool):
        import torch

        self.backend, self.cache, self.static, self.graphs = backend, cache, static, graphs and static
        dev = cache.layers[0].keys.device
        self.device = dev
        rows = cache.rows
        self.tok = torch.full((rows, 1), backend.pad_id, dtype=torch.long, device=dev)
        self.pos = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.slots = torch.arange(rows, device=dev)[:, None]
        self.columns = torch.arange(cache.width, device=dev)
        self.version = cache.version
        self.captured: dict[int, tuple[Any, Any]] = {}
        self.pool = None

    def bucket(self, b: int) -> int:
        return min(self.cache.rows, 1 << (b - 1).bit_length())

    def __call__(self, tok, pos: list[int]):
        import torch

        b = len(pos)
        if not self.static:
            p = torch.tensor(pos, dtype=torch.long, device=self.device)[:, None]
            return self._forward(tok[:, None], p, self.slots[:b], max(pos) + 1)
        if self.version != self.cache.version:  # buffers re-allocated: graphs point at the old ones
            self.captured.clear()
            self.columns = torch.arange(self.cache.width, device=self.device)
            self.version = self.cache.version
        nb = self.bucket(b)
        self.tok[:b, 0].copy_(tok)
        self.pos[:b, 0].copy_(torch.tensor(pos, dtype=torch.long))
        if nb > b:
            self.tok[b:nb].fill_(self.backend.pad_id)
            self.pos[b:nb].zero_()
        if self.graphs:
            entry = self.captured.get(nb) or self._capture(nb)
            if entry is not None:
                entry[0].replay()
                return entry[1][:b]
        return self._run(nb)[:b]

    def _run(self, nb: int):
        return self._forward(self.tok[:nb], self.pos[:nb], self.slots[:nb], self.cache.width)

    def _forward(self, tok, pos, slots, width: int):
        """tok, pos [n, 1]; attention mask [n, 1, 1, width]: column c visible to row j iff c <= pos[j]."""
        cols = self.columns[:width] if width <= self.columns.shape[0] else None
        if cols is None:
            import torch

            cols = torch.arange(width, device=self.device)
        mask = cols[None, None, None, :] <= pos[:, :, None, None]
        self.cache.plan(0, slots, pos, width)
        return self.backend._forward(input_ids=tok, attention_mask=mask, position_ids=pos,
                                     past_key_values=self.cache)

    def _capture(self, nb: int):
        import torch

        try:
            with torch.cuda.device(self.device):  # the model's GPU, whichever is current
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._run(nb)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._run(nb)
        except Exception as err:  # e.g. a model whose forward synchronises with the host
            log.warning("HFBackend: CUDA graph capture failed (%s: %s); decoding eagerly with static shapes",
                        type(err).__name__, err)
            self.graphs = False
            return None
        self.backend.stats["graph_captures"] += 1
        self.captured[nb] = (graph, out)
        return graph, out


class HFBackend:
    """transformers model + our own continuous-batching decode loop.

    Requests wait in a queue (sorted by prompt length, so rows admitted together pad little); up to
    `batch_size` rows decode together, one token per row per step. A row that samples an EOS token,
    completes a stop string or reaches its token budget leaves the batch at once (its slot is refilled
    with the last row's KV), and waiting requests take the free rows: their prompts run straight into
    their slots, in the same forward as the other rows' next tokens. `generate_stream`'s callback can
    put a finished request back at the head of the queue with more tokens appended (the rollout
    engine's retrieved documents), so no row ever waits for the slowest one.

    Prefix KV reuse: a prompt prefix whose KV is already known is not run again. The common prefix
    of the prompts admitted together (the system prompt) is run once; inside `with backend.session():`
    (the rollout engine opens one per `run_rollouts`) the KV of every row that stopped on a stop string
    is kept, so its continuation only runs the inserted document tokens. Sessions must not span a
    weight update (the engine's do not).

    `decode_mode`: "dynamic" (exact shapes each step), "static" (fixed shapes; CUDA graphs on CUDA),
    or "auto" = static on CUDA, dynamic elsewhere. Both give the same tokens (tests/unit/test_hf_decode.py).
    While decoding, a model using "sdpa" attention runs searchrl.agent.attention's copy-free
    grouped-query variant (same numbers on CPU, bitwise).
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, kv_reuse: bool = True,
                 session_max_bytes: int | None = None, decode_mode: str = "auto"):
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode: '{decode_mode}' is not one of {', '.join(DECODE_MODES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.kv_reuse = kv_reuse
        self.session_max_bytes = session_max_bytes
        self.decode_mode = decode_mode
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self._n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        # decode_steps: forward passes that each sample one token for every row still in the batch,
        # so generated_tokens / decode_steps is the mean batch occupancy.
        self.stats = {"calls": 0, "generated_tokens": 0, "prompt_tokens": 0, "prefill_tokens": 0,
                      "reused_tokens": 0, "decode_steps": 0, "graph_captures": 0, "seconds": 0.0}
        self._session: PrefixStore | None = None
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

    @property
    def static_decode(self) -> bool:
        return self.decode_mode == "static" or (self.decode_mode == "auto" and self.device.type == "cuda")

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
        self._session = PrefixStore(self._default_store_bytes())
        self._continue_stops = set(continue_stops) if continue_stops else None
        try:
            yield self
        finally:
            self._session = None
            self._continue_stops = None

    @contextmanager
    def decoding(self):
        """What the decode loop runs under: no autograd, the copy-free grouped-query attention
        (searchrl/agent/attention.py) and, on CPU, the output projection by rows."""
        import torch

        with torch.inference_mode(), gqa_attention(self.model), vocab_projection_by_rows(self.model):
            yield

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
            store = PrefixStore(self._default_store_bytes())
        order = sorted(range(n), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
        waiting = deque((i, prompts[i], budgets[i]) for i in order)
        t0 = time.perf_counter()
        with self.decoding():
            self._decode(waiting, StopWatcher(self.tokenizer, list(stop)), float(temperature), float(top_p), gen,
                         store, on_finish)
        self.stats["calls"] += 1
        self.stats["seconds"] += time.perf_counter() - t0

    def _decode(self, waiting: deque, watcher, temperature, top_p, gen, store, on_finish) -> None:
        """The decode loop: sample one token per row, report the rows that finished, move the last rows
        into their slots, then one forward: the remaining rows' tokens, plus the prompts of waiting
        requests admitted into the free rows when there are any (`_prefill`), else a plain decode
        step (`DecodeStep`)."""
        import torch

        rows: list[Row] = []
        logits = tok = None
        cache: SlotCache | None = None
        step: DecodeStep | None = None
        while waiting or rows:
            if rows:
                self.stats["decode_steps"] += 1
                tok, lp = self._sample(logits, temperature, top_p, gen)
                tok_l, lp_l = tok.tolist(), lp.tolist()
                keep, done = [], []
                for j, row in enumerate(rows):
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
                        store.add(row.prompt + row.ids[:-1], cache.row_kv(j, row.pos))
                if done:
                    waiting.extendleft(reversed(on_finish(done)))  # continuations go first
                if len(keep) < len(rows):
                    order = cache.keep_rows(keep, max((rows[j].pos for j in keep), default=0))
                    rows = [rows[j] for j in order]
                    tok = tok[torch.tensor(order, device=tok.device)] if order else None
            reqs = self._admit(waiting, (cache.rows if cache is not None else self.batch_size) - len(rows),
                               on_finish)
            if reqs:
                if cache is None:  # rows for the requests there are (fewer than batch_size: less memory)
                    need = max(len(p) + b for _, p, b in (*reqs, *waiting))
                    cache = SlotCache.for_model(self.model, min(self.batch_size, len(reqs) + len(waiting)),
                                                self._width(need))
                    step = DecodeStep(self, cache, static=self.static_decode, graphs=self.device.type == "cuda")
                new, logits = self._prefill(reqs, store, cache, rows, tok)
            elif rows:
                logits = step(tok, [r.pos for r in rows])
            for r in rows:  # their sampled token has run
                r.pos += 1
            if reqs:
                rows += new

    def _admit(self, waiting: deque, room: int, on_finish) -> list:
        """Take up to `room` waiting requests; one with no token budget is reported finished at once
        (what `on_finish` hands back waits for the next admission)."""
        if not waiting or room <= 0:
            return []
        reqs = [waiting.popleft() for _ in range(min(room, len(waiting)))]
        if any(len(p) == 0 for _, p, _ in reqs):
            raise ValueError("generate: empty prompt (every prompt needs at least one token)")
        self.stats["prompt_tokens"] += sum(len(p) for _, p, _ in reqs)
        empty = [(k, Generation([], "", [], "length", None)) for k, _, b in reqs if b <= 0]
        if empty:
            waiting.extendleft(reversed(on_finish(empty)))
        return [r for r in reqs if r[2] > 0]

    def _width(self, need: int) -> int:
        """Columns to allocate for `need`: rounded up (64 on CUDA, where the static mode attends over all
        of them; 128 elsewhere)."""
        return _round_up(need, 64 if self.device.type == "cuda" else 128)

    def _forward(self, **kw):
        return self.model(use_cache=True, logits_to_keep=1, **kw).logits[:, -1, :]

    def _shared_prefix(self, prompts, store: PrefixStore):
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
        if lcp < 2 * BLOCK:
            return
        ids = torch.tensor([prompts[0][:lcp]], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        self.model(input_ids=ids, position_ids=torch.arange(lcp, device=self.device)[None], past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        self.stats["prefill_tokens"] += lcp
        kv = [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in cache.layers]
        store.add(prompts[0][:lcp], kv, shared=True)

    def _prefill(self, reqs, store, cache: SlotCache, running: list[Row], tok) -> tuple[list[Row], Any]:
        """Admit `reqs` into the slots after the `running` rows: copy each one's reused prefix KV (c
        tokens) into columns [0, c), then run the rest of its prompt (s tokens) left-padded to S = max s:
        real token i of row j goes to column c_j + i and sees columns [0, c_j + i]; a padding query
        writes a column past its row's end (overwritten before it is ever visible) and sees only that
        column. Logits of the last position = each row's last prompt token.

        With running rows, their sampled tokens `tok` run in the same forward (one pass over the
        weights instead of a decode step plus a prefill): the model sees one packed sequence, the b
        decode tokens then the m x S prompt tokens, each written to its own slot and column, and
        attention runs per group (searchrl/agent/attention.py, `packed`). Returns (new rows, logits
        [b + len(reqs), vocab]: the running rows' next-token logits, then the new rows')."""
        import torch

        dev = self.device
        r0 = len(running)
        prompts = [p for _, p, _ in reqs]
        hits: list[tuple[PrefixEntry | None, int]] = [(None, 0)] * len(reqs)
        if store is not None:
            hits = [store.lookup(p) for p in prompts]
            if len(reqs) > 1 and all(c == 0 for _, c in hits):
                self._shared_prefix(prompts, store)
                hits = [store.lookup(p) for p in prompts]
        m = len(reqs)
        reused = [c for _, c in hits]
        S = max(len(p) - c for p, c in zip(prompts, reused, strict=True))
        width = max(c + S for c in reused)
        need = max(width, max(len(p) + b for _, p, b in reqs))
        if need > cache.width:
            cache.widen(self._width(max(need, cache.width + cache.width // 4)))
        inp = torch.full((m, S), self.pad_id, dtype=torch.long)
        pos = torch.zeros((m, S), dtype=torch.long)
        cols = torch.zeros((m, S), dtype=torch.long)
        first = torch.zeros(m, dtype=torch.long)  # first real query index of each row
        for j, (p, c) in enumerate(zip(prompts, reused, strict=True)):
            s = len(p) - c
            off = S - s
            inp[j, off:] = torch.tensor(p[c:], dtype=torch.long)
            pos[j, off:] = torch.arange(c, c + s)
            cols[j, off:] = pos[j, off:]
            cols[j, :off] = torch.arange(c + s, c + S)  # padding: past the row's end
            first[j] = off
        real = torch.arange(S)[None, :] >= first[:, None]  # [m, S]
        span = torch.arange(width)
        mask = torch.where(real[:, :, None], span[None, None, :] <= pos[:, :, None],
                           span[None, None, :] == cols[:, :, None])[:, None]  # [m, 1, S, width]
        same = hits[0][0] is not None and all(e is hits[0][0] and c == reused[0] for e, c in hits)
        if same and reused[0] > 0:  # one shared prefix (round 1): a single broadcast copy
            cache.load(r0, hits[0][0].kv, reused[0], count=m)
        else:
            for j, (e, c) in enumerate(hits):
                if e is not None and c > 0:
                    cache.load(r0 + j, e.kv, c)
        if self._session is not None:  # a fully reused history is not needed again
            for e, c in hits:
                if e is not None and not e.shared and c == len(e.seq):
                    store.drop(e)
        self.stats["prefill_tokens"] += int(sum(len(p) - c for p, c in zip(prompts, reused, strict=True)))
        self.stats["reused_tokens"] += int(sum(reused))
        pos, cols, mask = pos.to(dev), cols.to(dev), mask.to(dev)
        rows = [Row(k, list(p), b, pos=len(p)) for k, p, b in reqs]  # own copy: callers extend their histories
        if not running:
            cache.plan(r0, torch.arange(r0, r0 + m, device=dev)[:, None], cols, width)
            logits = self._forward(input_ids=inp.to(dev), attention_mask=mask, position_ids=pos,
                                   past_key_values=cache)
            return rows, logits
        b = len(running)
        dpos = torch.tensor([r.pos for r in running], dtype=torch.long, device=dev)
        dwidth = int(dpos.max()) + 1
        dmask = torch.arange(dwidth, device=dev)[None, None, None, :] <= dpos[:, None, None, None]
        slots = torch.cat([torch.arange(b, device=dev), torch.arange(r0, r0 + m, device=dev).repeat_interleave(S)])
        cache.plan(0, slots, torch.cat([dpos, cols.flatten()]), max(dwidth, width), packed=True)
        keep = torch.tensor([*range(b), *(b + (j + 1) * S - 1 for j in range(m))], device=dev)
        out = self.model(input_ids=torch.cat([tok, inp.to(dev).flatten()])[None],
                         position_ids=torch.cat([dpos, pos.flatten()])[None], attention_mask=dmask,
                         past_key_values=cache, use_cache=True, logits_to_keep=keep,
                         packed=((0, b, 1, 0, dwidth, dmask), (b, m, S, r0, width, mask)))
        return rows, out.logits[0]

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
