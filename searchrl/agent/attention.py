"""Masked grouped-query attention without copying the KV cache (used by HFBackend while it decodes).

transformers' "sdpa" attention (integrations/sdpa_attention.py) passes `enable_gqa=True` to
`scaled_dot_product_attention` only when there is no attention mask; with a mask, which every padded
or continuous batch has, it first expands K and V to one copy per query head (`repeat_kv`), i.e.
copies the whole cache `num_key_value_groups` times per layer per step (3x for SmolLM2, 7x for
Qwen2.5-7B). Measured on this project's CPU (one layer, 16 rows x 400 cached tokens, SmolLM2's
9 query / 3 KV heads): 16-24 ms with the copy, under 1 ms without; on an H200 the same copy was most
of a 135M decode step (issue 13).

`gqa_sdpa_attention` is that function with the copy taken out:
- CPU: the same SDPA call with `enable_gqa=True` and the mask (the CPU flash kernel supports both;
  bitwise equal to the expanded call, tests/unit/test_hf_decode.py checks it);
- CUDA (where `enable_gqa` with a mask falls back to the math kernel): the G query heads that share a
  KV head become G query rows of that KV head ([B, H, S, D] -> [B, Hkv, G*S, D], mask rows repeated
  G times), one memory-efficient-attention call, and the output is viewed back;
- no mask, no grouping, or another device: transformers' own `sdpa_attention_forward`.

`gqa_attention(model)` switches a model that uses "sdpa" to it for the duration of a `with` block
(and registers the matching mask function, so transformers builds the same masks as for "sdpa").
"""

from __future__ import annotations

from contextlib import contextmanager

NAME = "searchrl_gqa_sdpa"
_registered = False


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, packed=None, **kwargs):
    """query [B, H, S, D], key/value [B, Hkv, L, D], attention_mask [B|1, 1, S, L] (bool or additive)
    or None -> (output [B, S, H, D], None), as transformers' attention functions return.

    `packed` (a model kwarg that reaches the attention): the batch is one packed sequence (B = 1) whose
    tokens belong to different KV slots (searchrl/agent/kv_cache.py, SlotCache.plan(packed=True);
    key/value are then every slot, [slots, Hkv, width, D]). It lists groups (q_start, n, q_len, slot0,
    width, mask): queries q_start .. q_start + n * q_len are n sequences of q_len tokens, sequence i in
    slot slot0 + i, attending to its first `width` columns under mask [n, 1, q_len, width]. The
    attention runs once per group (the rollout engine has two: the running rows' decode tokens, one per
    row, and the admitted prompts) and the outputs are put back in token order."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if packed is not None:
        outs = []
        for q_start, n, q_len, slot0, width, mask in packed:
            q = query[0, :, q_start: q_start + n * q_len].unflatten(1, (n, q_len)).transpose(0, 1)
            k, v = key[slot0: slot0 + n, :, :width], value[slot0: slot0 + n, :, :width]
            out, _ = gqa_sdpa_attention(module, q, k, v, mask, dropout=dropout, scaling=scaling)
            outs.append(out.flatten(0, 1))  # [n * q_len, H, D]
        return torch.cat(outs)[None], None
    if (attention_mask is None or groups <= 1 or kwargs.get("position_bias") is not None
            or query.device.type not in ("cpu", "cuda") or key.shape[-1] != value.shape[-1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if query.device.type == "cpu":
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return grouped_query_sdpa(query, key, value, attention_mask, groups, dropout, scaling), None


def grouped_query_sdpa(query, key, value, attention_mask, groups: int, dropout: float = 0.0, scaling=None):
    """The CUDA branch of `gqa_sdpa_attention`, on any device (tests run it on CPU): the `groups`
    query heads that share a KV head are run as `groups` x S query rows of that head. query [B, H, S, D],
    key/value [B, H / groups, L, D], mask [B|1, 1, S, L] -> output [B, S, H, D]."""
    import torch

    B, H, S, D = query.shape
    hkv, L = key.shape[1], key.shape[2]
    q = query.reshape(B, hkv, groups * S, D)  # head h = kv_head * groups + g (repeat_kv's order)
    mask = attention_mask
    if S == 1:
        mask = mask.expand(mask.shape[0], 1, groups, L)  # a broadcast view, no copy
    else:
        mask = mask[:, :, None].expand(mask.shape[0], 1, groups, S, L).reshape(mask.shape[0], 1, groups * S, L)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(B, H, S, D).transpose(1, 2).contiguous()


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


@contextmanager
def gqa_attention(model):
    """Inside the block, a model whose attention implementation is "sdpa" uses `gqa_sdpa_attention`
    (same results, no KV copies); any other implementation (eager, flash, a custom one) is left alone."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
