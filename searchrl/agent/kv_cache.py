"""KV storage for HFBackend's decode loop: per-row cache slots, and prefix KV kept for reuse.

`SlotCache` (a transformers `Cache`): one slot per batch row, preallocated `[rows, kv_heads, width,
head_dim]` per layer, left-aligned: the token at position p of a row's sequence is column p of its
slot. Before each forward the decode loop says which slots the batch rows are (`plan`) and at which
columns their new tokens go; `update` writes them there and returns the slots' first `view` columns,
and the loop's attention mask lets each query see exactly the columns of its own sequence up to its
position. Rows of different lengths therefore need no padding in front, a row that leaves frees its
slot (the last rows move into the holes: `keep_rows`), and admitted rows are written straight into
free slots: no cache is ever concatenated or re-allocated in the loop (the previous layout copied the
whole batch's cache into a new buffer at every admission). Fixed addresses and shapes are also what
a CUDA graph needs (searchrl/agent/hf_backend.py, `StaticDecode`).

`PrefixStore`: KV of token sequences already run through the model, found again by longest shared
prefix, so a continuation (prompt + generated + inserted documents) only runs its new tokens.
"""

from __future__ import annotations

import weakref
from typing import Any

from transformers.cache_utils import Cache, CacheLayerMixin

BLOCK = 16  # prefix-cache granularity (tokens)


class SlotLayer(CacheLayerMixin):
    """One layer of a `SlotCache` (keys/values [rows, kv_heads, width, head_dim])."""

    is_sliding = False

    def __init__(self, owner: SlotCache, keys, values):
        super().__init__()
        # a proxy, not a reference: a cycle cache -> layer -> cache would keep the slots (up to ~1 GB)
        # alive after the decode loop, until Python's cyclic collector happened to run (e.g. through
        # an RL step's backward pass)
        self.owner = weakref.proxy(owner)
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states/value_states [n, kv_heads, S, head_dim] for the planned rows -> their slots'
        keys/values [n, kv_heads, view, head_dim] (views, no copy)."""
        o = self.owner
        if key_states.shape[1:2] + key_states.shape[3:] != self.keys.shape[1:2] + self.keys.shape[3:]:
            raise ValueError(f"SlotCache: key states {tuple(key_states.shape)} do not fit slots "
                             f"{tuple(self.keys.shape)} (kv heads / head dim)")
        if o.packed:  # [1, H, T, D]: token t -> slot slots[t], column cols[t]
            self.keys[o.slots, :, o.cols] = key_states[0].transpose(0, 1)
            self.values[o.slots, :, o.cols] = value_states[0].transpose(0, 1)
            return self.keys, self.values
        self.keys[o.slots, :, o.cols] = key_states.transpose(1, 2)
        self.values[o.slots, :, o.cols] = value_states.transpose(1, 2)
        n = key_states.shape[0]
        return self.keys[o.row0: o.row0 + n, :, : o.view], self.values[o.row0: o.row0 + n, :, : o.view]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.view, 0

    def get_seq_length(self) -> int:
        return self.owner.view

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """KV slots for up to `rows` sequences of up to `width` tokens each (zero-filled, so a masked
    column always holds finite numbers: 0-weight x value stays 0)."""

    def __init__(self, n_layers: int, rows: int, width: int, kv_heads: int, head_dim: int, dtype, device):
        import torch

        shape = (rows, kv_heads, width, head_dim)
        layers = [SlotLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                            torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        super().__init__(layers=layers)
        self.rows, self.width = rows, width
        self.row0, self.view = 0, width
        self.slots = self.cols = None
        self.packed = False
        self.version = 0  # bumped when the buffers are re-allocated (captured CUDA graphs are then stale)

    @classmethod
    def for_model(cls, model, rows: int, width: int) -> SlotCache:
        """Slots shaped for a decoder-only transformers model (its dtype and device)."""
        cfg = model.config.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, rows, width, kv_heads, head_dim, p.dtype, p.device)

    def plan(self, row0: int, slots, cols, view: int, packed: bool = False) -> None:
        """The next forward runs slots row0.. (`slots` [n, 1] = row0 + arange(n), a tensor so that a CUDA
        graph can keep it); its token (j, i) is written at column cols[j, i]; attention sees columns
        [0, view). packed=True: the forward is one packed sequence of T tokens from several slots,
        token t written to slot slots[t] (shape [T]) at column cols[t]; `update` then returns every
        slot, and the attention picks each group's slots (searchrl/agent/attention.py)."""
        if view > self.width:
            raise ValueError(f"SlotCache: {view} columns planned, {self.width} allocated")
        self.row0, self.slots, self.cols, self.view, self.packed = row0, slots, cols, view, packed

    def widen(self, width: int) -> None:
        """Re-allocate every layer `width` columns wide, keeping the current contents."""
        import torch

        if width <= self.width:
            return
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = torch.zeros((*old.shape[:2], width, old.shape[3]), dtype=old.dtype, device=old.device)
                new[:, :, : old.shape[2]] = old
                setattr(layer, name, new)
        self.width = width
        self.version += 1

    def load(self, slot: int, kv: list[tuple[Any, Any]], c: int, count: int = 1) -> None:
        """Write reused KV (per layer (K [H, >=c, D], V)) into columns [0, c) of `count` slots from `slot`."""
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.keys[slot: slot + count, :, :c] = k[None, :, :c]
            layer.values[slot: slot + count, :, :c] = v[None, :, :c]

    def row_kv(self, slot: int, n: int) -> list[tuple[Any, Any]]:
        """Copies of the first n columns of a slot, per layer (K [H, n, D], V)."""
        return [(layer.keys[slot, :, :n].clone(), layer.values[slot, :, :n].clone()) for layer in self.layers]

    def keep_rows(self, keep: list[int], n_cols: int) -> list[int]:
        """Keep slots `keep` in slots 0..len(keep)-1: each dropped slot among those is filled from a kept
        slot past them (the fewest copies; only the first n_cols columns are copied). Returns the old
        slot of each new one."""
        k = len(keep)
        holes = sorted(set(range(k)) - set(keep))
        moves = list(zip(holes, [j for j in keep if j >= k], strict=True))
        for layer in self.layers:
            for dst, src in moves:
                layer.keys[dst, :, :n_cols] = layer.keys[src, :, :n_cols]
                layer.values[dst, :, :n_cols] = layer.values[src, :, :n_cols]
        order = list(range(k))
        for dst, src in moves:
            order[dst] = src
        return order


class PrefixEntry:
    __slots__ = ("seq", "kv", "keys", "nbytes", "shared")

    def __init__(self, seq: list[int], kv: list[tuple[Any, Any]], shared: bool = False):
        self.seq = seq
        self.shared = shared  # a common prompt prefix (kept), not one rollout's history
        self.kv = kv  # per layer (K [H, len, D], V [H, len, D]) for seq
        self.keys: list[int] = []
        self.nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)


class PrefixStore:
    """KV of token sequences already run through the model, found again by longest shared prefix
    (block-hash chain over 16-token blocks, then an exact comparison). LRU within a byte budget.

    Only valid while the weights do not change: HFBackend keeps one per `generate` call (shared
    system prompt), or one per `session()` (the engine's rounds: the next prompt of a rollout extends
    the sequence it just generated, so only the new env tokens need a forward pass)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.index: dict[int, PrefixEntry] = {}
        self.entries: dict[int, PrefixEntry] = {}  # id(entry) -> entry, insertion order = LRU order
        self.bytes = 0
        self.hits = self.hit_tokens = self.lookups = 0

    @staticmethod
    def _chain(seq: list[int], nblocks: int):
        h = 0
        for k in range(nblocks):
            h = hash((h, tuple(seq[k * BLOCK:(k + 1) * BLOCK])))
            yield h

    def add(self, seq: list[int], kv, shared: bool = False) -> PrefixEntry | None:
        if len(seq) < BLOCK:
            return None
        e = PrefixEntry(list(seq), kv, shared)
        if e.nbytes > self.max_bytes:
            return None
        for h in self._chain(seq, len(seq) // BLOCK):
            self.index[h] = e
            e.keys.append(h)
        self.entries[id(e)] = e
        self.bytes += e.nbytes
        while self.bytes > self.max_bytes and self.entries:
            self.drop(next(iter(self.entries.values())))
        return e

    def drop(self, e: PrefixEntry) -> None:
        if self.entries.pop(id(e), None) is None:
            return
        self.bytes -= e.nbytes
        for h in e.keys:
            if self.index.get(h) is e:
                del self.index[h]

    def lookup(self, p: list[int]) -> tuple[PrefixEntry | None, int]:
        """(entry, c): the first c tokens of p have their KV in entry (c <= len(p) - 1)."""
        self.lookups += 1
        best = None
        nb = 0
        for k, h in enumerate(self._chain(p, (len(p) - 1) // BLOCK)):
            e = self.index.get(h)
            if e is None:
                break
            best, nb = e, k + 1
        if best is None or best.seq[: nb * BLOCK] != p[: nb * BLOCK]:
            return None, 0
        c = nb * BLOCK
        lim = min(len(best.seq), len(p) - 1)
        while c < lim and best.seq[c] == p[c]:
            c += 1
        self.entries[id(best)] = self.entries.pop(id(best))  # most recently used
        self.hits += 1
        self.hit_tokens += c
        return best, c


