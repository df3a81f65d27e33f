"""Tokenizer and chat-template helpers shared by every backend and stage.

Token-in, token-out: prompts are token ids; `decode` is exact (special tokens kept, no space
clean-up). Text we write ourselves is tokenised with `encode`; text from data, the web or another
model with `encode_untrusted`, which can never yield an added/special token id.
"""

from __future__ import annotations

import re

# Special tokens that end a turn in the chat models we care about (Qwen, Llama-3, SmolLM, GPT-2).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")


def decode(tokenizer, ids: list[int]) -> str:
    """Decode exactly (special tokens kept, no clean-up of spaces): the text the tokens stand for."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode(tokenizer, text: str) -> list[int]:
    """Tokenise a piece of TRUSTED text on its own (no BOS/EOS added): added-token strings in it
    ("<|im_end|>", "<file_sep>", ...) become their special ids. Text from data, the web or another
    model goes through `encode_untrusted`."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def added_tokens(tokenizer) -> tuple[str, ...]:
    """Every added or special token string of the tokenizer, longest first.

    `all_special_tokens` lists only the named ones (SmolLM2: 3 of its 17 added tokens); the full set is
    the added vocabulary (`added_tokens_decoder`), special or not (Qwen2.5's `<tool_call>` is a
    non-special added token). Blank ones (added whitespace runs) are left out: they are not control
    tokens, and text cannot avoid whitespace."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        found.add(str(getattr(tok, "content", tok)))
    return tuple(sorted((t for t in found if t and t.strip()), key=lambda t: (-len(t), t)))


def encode_untrusted(tokenizer, text: str, allow: tuple[str, ...] | list[str] = ()) -> list[int]:
    """Tokenise text from data, the web or another model so that it can never produce an added/special
    token id, except for the strings in `allow` (the protocol's own tags: trusted frame).

    An added-token string found in the text is encoded as plain text: the text is cut one character
    into each occurrence and the pieces are encoded separately, so no piece contains a whole added
    token (every piece ends before the next occurrence is complete). Text without any occurrence, the
    usual case, is encoded in one call exactly like `encode`. `decode(ids) == text` for byte-level
    tokenizers. (One-character added tokens cannot be avoided this way; no tokenizer we use has one.)"""
    banned = [t for t in added_tokens(tokenizer) if t not in allow and len(t) > 1]
    pattern = re.compile("|".join(map(re.escape, banned))) if banned else None
    if pattern is None or pattern.search(text) is None:
        return encode(tokenizer, text)
    ids: list[int] = []
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        ids.extend(encode(tokenizer, text[pos: m.start() + 1]))
        pos = m.start() + 1
    ids.extend(encode(tokenizer, text[pos:]))
    return ids


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
    for tok in END_TOKENS:
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

    `system` and `assistant_prefix` are ours (trusted); `user` carries data (a question, passages) and
    never yields an added/special token id: when it contains an added-token string, the template is
    rendered around a marker and the user text is encoded on its own with `encode_untrusted`.
    Otherwise the whole prompt is one `encode` call.
    """
    if not any(t in user for t in added_tokens(tokenizer)):
        return encode(tokenizer, _render_chat(tokenizer, system, user, assistant_prefix))
    marker = "\x00USER\x00"
    frame = _render_chat(tokenizer, system, marker, assistant_prefix)
    if frame.count(marker) != 1:  # a template that moves or repeats the message: drop the tokens instead
        for tok in added_tokens(tokenizer):
            user = user.replace(tok, " ")
        return encode(tokenizer, _render_chat(tokenizer, system, user, assistant_prefix))
    head, tail = frame.split(marker)
    return encode(tokenizer, head) + encode_untrusted(tokenizer, user) + encode(tokenizer, tail)


def _render_chat(tokenizer, system: str | None, user: str, assistant_prefix: str) -> str:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (f"{system}\n\n" if system else "") + f"User: {user}\nAssistant:"
        if assistant_prefix and not assistant_prefix.startswith((" ", "\n")):
            text += " "
    return text + assistant_prefix


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template rendered as text (`tools`: JSON tool schemas, for templates that
    support them). Raises ValueError when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    kw = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)


def fill_prompt_ids(tokenizer, frame: str, marker: str, data: str) -> list[int]:
    """Token ids of `frame` (trusted prompt text: our instructions, the chat template's tokens) with
    its one `marker` replaced by `data` (a question: untrusted).

    Data without any added-token string is tokenised together with the frame in one `encode` call
    (the ids a reference implementation that formats and tokenises the whole string gets); otherwise
    the frame pieces are encoded on their own and the data with `encode_untrusted`, so the data never
    yields an added/special token id. Raises ValueError when `frame` does not hold `marker` exactly once."""
    if frame.count(marker) != 1:
        raise ValueError(f"prompt frame holds the marker {frame.count(marker)} times (need 1)")
    head, tail = frame.split(marker)
    if not any(t in data for t in added_tokens(tokenizer)):
        return encode(tokenizer, head + data + tail)
    return encode(tokenizer, head) + encode_untrusted(tokenizer, data) + encode(tokenizer, tail)
