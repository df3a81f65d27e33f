"""HFBackend's decode machinery on CPU: the copy-free grouped-query attention, the KV slots, the
static-shape decode step (the CUDA-graph path, run eagerly here) and the stop-string pre-check."""

from __future__ import annotations

import random

import pytest

from searchrl.agent.backends import decode, encode
from searchrl.agent.generation import StopWatcher


@pytest.fixture(scope="module")
def tok():
    from searchrl.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def model(tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(conf).eval()


def _prompts(tok, n=7):
    from searchrl.agent.backends import chat_prompt_ids

    qs = ["What is the capital of France?", "Who wrote Hamlet?", "Name a colour.", "2+2?", "Hi",
          "Where was the founder of Zorvath Inc born? Think step by step.", "Why?"]
    return [chat_prompt_ids(tok, "Be brief.", q) for q in qs[:n]]


# ----------------------------------------------------------------------------- attention
def _qkv_mask(S: int, B=5, H=6, hkv=2, L=40, D=16):
    import torch

    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, hkv, L, D, generator=g)
    v = torch.randn(B, hkv, L, D, generator=g)
    cols = torch.arange(L)
    ends = torch.tensor([L - 1, L - 5, 20, L - S, 7 + S])  # rows of different lengths, causal within S
    pos = ends[:, None] - (S - 1) + torch.arange(S)[None]
    mask = (cols[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, S, L]
    return q, k, v, mask


@pytest.mark.parametrize("S", [1, 4])
def test_gqa_attention_equals_transformers_sdpa_bitwise_on_cpu(S):
    """The CPU branch (SDPA with enable_gqa and the mask) gives exactly transformers' result (which
    copies K/V per query head first), decode (S=1) and prefill (S>1)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from searchrl.agent.attention import gqa_sdpa_attention

    q, k, v, mask = _qkv_mask(S)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    module.is_causal = True
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    out, _ = gqa_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    assert out.shape == ref.shape == (5, S, 6, 16)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("S", [1, 4])
def test_grouped_query_rows_equal_sdpa(S):
    """The CUDA branch (query heads of one KV head as extra query rows) computes the same attention."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from searchrl.agent.attention import grouped_query_sdpa

    q, k, v, mask = _qkv_mask(S)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    module.is_causal = True
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    out = grouped_query_sdpa(q, k, v, mask, 3, scaling=0.25)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)


def test_packed_groups_equal_separate_attention():
    """A packed sequence (2 decode tokens of slots 0-1, then 2 prompts x 3 tokens of slots 2-3) gives,
    token for token, what each group's own attention call gives."""
    import torch

    from searchrl.agent.attention import gqa_sdpa_attention

    g = torch.Generator().manual_seed(1)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    H, hkv, D, W = 6, 2, 8, 12
    key, value = torch.randn(4, hkv, W, D, generator=g), torch.randn(4, hkv, W, D, generator=g)
    query = torch.randn(1, H, 2 + 2 * 3, D, generator=g)
    cols = torch.arange(W)
    dmask = (cols[None, :] <= torch.tensor([7, 4])[:, None])[:, None, None]  # [2, 1, 1, W]
    ppos = torch.tensor([[5, 6, 7], [2, 3, 4]])
    pmask = (cols[None, None, :] <= ppos[:, :, None])[:, None]  # [2, 1, 3, W]
    out, _ = gqa_sdpa_attention(module, query, key, value, dmask,
                                packed=((0, 2, 1, 0, W, dmask), (2, 2, 3, 2, W, pmask)))
    assert out.shape == (1, 8, H, D)
    dec, _ = gqa_sdpa_attention(module, query[0, :, :2, None].transpose(0, 1), key[:2], value[:2], dmask)
    pre, _ = gqa_sdpa_attention(module, query[0, :, 2:].unflatten(1, (2, 3)).transpose(0, 1), key[2:], value[2:],
                                pmask)
    assert torch.equal(out[0, :2], dec[:, 0]) and torch.equal(out[0, 2:], pre.flatten(0, 1))


def test_gqa_attention_context_restores_the_model(model):
    from searchrl.agent.attention import NAME, gqa_attention

    assert model.config._attn_implementation == "sdpa"
    with gqa_attention(model):
        assert model.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), gqa_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- KV slots
def test_slot_cache_keep_rows_widen_and_row_kv():
    import torch

    from searchrl.agent.kv_cache import SlotCache

    c = SlotCache(n_layers=2, rows=4, width=8, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    for layer in c.layers:
        for r in range(4):
            layer.keys[r] = float(r + 1)
            layer.values[r] = -float(r + 1)
    order = c.keep_rows([0, 2, 3], n_cols=5)  # slot 1 leaves: slot 3 moves into it
    assert order == [0, 3, 2]
    assert c.layers[1].keys[1, 0, :5].eq(4.0).all() and c.layers[1].keys[1, 0, 5:].eq(2.0).all()
    c.widen(12)
    assert c.width == 12 and c.version == 1 and c.layers[0].keys.shape == (4, 1, 12, 2)
    assert c.layers[0].keys[2, 0, :8].eq(3.0).all() and c.layers[0].keys[2, 0, 8:].eq(0.0).all()
    kv = c.row_kv(0, 3)
    assert kv[0][0].shape == (1, 3, 2) and kv[0][1].eq(-1.0).all()
    kv[0][0].fill_(9.0)  # a copy: the slot is untouched
    assert c.layers[0].keys[0, :, :8].eq(1.0).all()
    c.load(1, kv, 2, count=2)
    assert c.layers[0].keys[1:3, 0, :2].eq(9.0).all() and c.layers[0].keys[1, 0, 2:5].eq(4.0).all()


# ----------------------------------------------------------------------------- static decode (CUDA-graph path)
def _backend(model, tok, mode, batch_size=3):
    from searchrl.agent.hf_backend import HFBackend

    return HFBackend(model, tok, batch_size=batch_size, decode_mode=mode)


def test_static_decode_gives_the_dynamic_tokens_with_stops_budgets_and_continuations(model, tok, monkeypatch):
    """The fixed-shape step (row buckets, idle rows, attention over the cache's whole width) decodes
    the same tokens as the exact-shape one: rows that stop, rows that come back with text appended,
    sessions with reused KV, and a cache that has to grow."""
    from searchrl.agent.kv_cache import SlotCache

    widened = []
    widen = SlotCache.widen
    monkeypatch.setattr(SlotCache, "widen", lambda self, w: widened.append(w) or widen(self, w))
    prompts = _prompts(tok)
    env = encode(tok, "\n<document>\n(1) inserted text, long enough to need more columns than the first "
                      "prompts asked for. " * 4 + "\n</document>\n")
    free = _backend(model, tok, "dynamic").generate(prompts, max_new_tokens=10)
    stop = [decode(tok, [free[1].token_ids[3]]), decode(tok, [free[3].token_ids[6]])]

    def run(mode):
        b = _backend(model, tok, mode)
        seen: dict[int, list] = {}

        def on_finish(done):
            more = []
            for i, g in done:
                seen.setdefault(i, []).append(g)
                if len(seen[i]) < 3:
                    more.append((i, calls[i][-1] + g.token_ids + env, 4 + 3 * len(seen[i])))
                    calls[i].append(more[-1][1])
            return more

        calls = {i: [p] for i, p in enumerate(prompts)}
        with b.session():
            b.generate_stream(prompts, max_new_tokens=[10, 7, 12, 9, 4, 6, 8], stop=stop, on_finish=on_finish)
        return seen, b.stats

    dyn, dyn_stats = run("dynamic")
    sta, sta_stats = run("static")
    assert {g.finish for gens in dyn.values() for g in gens} >= {"stop", "length"}
    assert dyn_stats["reused_tokens"] > 0 and dyn_stats["reused_tokens"] == sta_stats["reused_tokens"]
    for i in dyn:
        for a, b in zip(dyn[i], sta[i], strict=True):
            assert a.token_ids == b.token_ids and a.finish == b.finish and a.stop == b.stop
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    assert sta_stats["decode_steps"] == dyn_stats["decode_steps"]
    assert len(widened) >= 2  # both modes had to grow the cache for the continuations


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_the_kv_slots_are_sized_to_the_requests_and_freed_when_generate_returns(model, tok, monkeypatch, mode):
    """The slots are allocated for the requests there are (at most batch_size rows), not batch_size,
    and freed by reference counting when the decode loop ends: an RL step trains right after its
    rollouts, and slots left to Python's cyclic collector stayed alive through the backward pass
    (~0.9 GB for the 135M policy at batch_size 32)."""
    import gc
    import weakref

    from searchrl.agent.kv_cache import SlotCache

    made = []
    for_model = SlotCache.for_model.__func__
    monkeypatch.setattr(SlotCache, "for_model",
                        classmethod(lambda cls, m, rows, width: made.append(for_model(cls, m, rows, width)) or made[-1]))
    b = _backend(model, tok, mode, batch_size=32)
    gc.disable()
    try:
        out = b.generate(_prompts(tok, 5), max_new_tokens=6)
        assert len(out) == 5 and [c.rows for c in made] == [5]
        refs = [weakref.ref(layer.keys) for layer in made[0].layers]
        made.clear()
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_static_step_rounds_rows_up_to_a_bucket(model, tok):
    import torch

    from searchrl.agent.hf_backend import DecodeStep
    from searchrl.agent.kv_cache import SlotCache

    b = _backend(model, tok, "static", batch_size=8)
    cache = SlotCache.for_model(model, rows=8, width=32)
    step = DecodeStep(b, cache, static=True, graphs=False)
    assert [step.bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with torch.inference_mode():
        out = step(torch.tensor([5, 6, 7]), [0, 3, 9])
    assert out.shape == (3, len(tok)) and step.tok[3, 0] == b.pad_id and step.pos[:4, 0].tolist() == [0, 3, 9, 0]


def test_failed_graph_capture_falls_back_to_eager_static_steps(model, tok, caplog):
    """On a machine without CUDA the capture fails at once: the step says so once and decodes eagerly
    (on a GPU the same fallback covers a model whose forward cannot be captured)."""
    import torch

    from searchrl.agent.hf_backend import DecodeStep
    from searchrl.agent.kv_cache import SlotCache

    if torch.cuda.is_available():
        pytest.skip("CUDA present: capture would succeed")
    b = _backend(model, tok, "static", batch_size=4)
    ref = _backend(model, tok, "static", batch_size=4)
    cache, ref_cache = SlotCache.for_model(model, 4, 16), SlotCache.for_model(model, 4, 16)
    step = DecodeStep(b, cache, static=True, graphs=True)
    plain = DecodeStep(ref, ref_cache, static=True, graphs=False)
    with torch.inference_mode(), caplog.at_level("WARNING"):
        for pos in ([0, 0], [1, 1], [2, 2]):
            out = step(torch.tensor([10, 11]), pos)
            assert torch.equal(out, plain(torch.tensor([10, 11]), pos))
    assert not step.graphs and sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1
    assert b.stats["graph_captures"] == 0


def test_decode_mode_is_checked(model, tok):
    with pytest.raises(ValueError, match="decode_mode"):
        _backend(model, tok, "graphs")
    assert _backend(model, tok, "auto").static_decode is False  # CPU: exact shapes
    assert _backend(model, tok, "static").static_decode is True


# ----------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("stops", [["</external>", "</answer>"], ["\n\n"], ["<|end_of_query|>", "é"], ["Paris "]])
def test_stop_watcher_precheck_never_changes_the_answer(tok, stops):
    """At every step of random token streams (and streams that do contain the stop strings), the
    pre-checked `match` equals a full tail decode."""
    w = StopWatcher(tok, stops)
    rng = random.Random(0)
    pieces = [encode(tok, s) for s in ("The answer is <answer>Paris</answer> ", "<external>x</external>\n\n",
                                       " café é ", "<|end_of_query|>", "Paris is nice")]
    checked = matched = 0
    for _ in range(40):
        ids: list[int] = []
        for _ in range(20):
            for t in (rng.choice(pieces) if rng.random() < 0.3 else [rng.randrange(len(tok))]):
                ids.append(t)  # one token per step, as the decode loop appends them
                tail = decode(tok, ids[-w.window:])
                full = min((s for s in w.stops if s in tail), key=lambda s: tail.find(s), default=None)
                assert w.match(ids) == full
                checked += 1
                if full is not None:  # the row ends here
                    matched += 1
                    ids = []
    assert matched > 0 and checked > 500
    assert (w._finals is None) == any(s[-1].isspace() or not s[-1].isascii() for s in stops)


# ----------------------------------------------------------------------------- CPU output projection
def test_vocab_projection_by_rows(model):
    """One row: F.linear exactly (the one-at-a-time path is unchanged); several rows: the same logits
    to float rounding; the module is restored afterwards, and a layer with hooks is left alone."""
    import torch
    import torch.nn.functional as F

    from searchrl.agent.hf_backend import vocab_projection_by_rows

    head = model.get_output_embeddings()
    x1, x5 = torch.randn(1, 1, 64), torch.randn(5, 1, 64)
    with torch.inference_mode(), vocab_projection_by_rows(model):
        assert "forward" in vars(head)
        one, five = head(x1), head(x5)
    assert "forward" not in vars(head)
    assert torch.equal(one, F.linear(x1, head.weight))
    assert five.shape == (5, 1, head.weight.shape[0]) and five.is_contiguous()
    assert torch.allclose(five, F.linear(x5, head.weight), atol=1e-5, rtol=1e-5)
    head.forward = head.forward  # an instance-level forward (as hooks install) is not replaced
    try:
        with vocab_projection_by_rows(model):
            assert vars(head)["forward"] == head.__class__.forward.__get__(head)
    finally:
        del head.forward
