"""Tag protocols: how a policy asks for retrieval, how documents come back, where the answer goes.

A protocol is an adapter over the one rollout loop (searchrl/agent/engine.py): prompt, stop strings,
query extraction and cleaning, the exact text the environment inserts, passage sanitising, answer
extraction and the format validator the rewards call (base.py). The protocols:

| name           | model writes                                   | environment inserts                                     | answer                | module        |
|----------------|------------------------------------------------|---------------------------------------------------------|-----------------------|---------------|
| r1searcher_pp  | <internal>fact</internal> <external>q</external> | \\n<document>\\n(1) Title: text\\n...</document>\\n           | <answer>a</answer>    | r1searcher.py |
| r1searcher     | <|begin_of_query|> q <|end_of_query|>            | \\n\\n<|begin_of_documents|>\\n(1)Title: t Text: x\\n...<|end_of_documents|>\\n\\n | </think> <answer>a</answer> | r1searcher.py |
| search_r1      | <think>..</think> <search> q </search>           | \\n\\n<information>Doc 1(Title: t) x\\n...</information>\\n\\n | <answer>a</answer>    | search_r1.py  |
| tool_call      | <tool_call>{"name": "search", "arguments": {"query": q}}</tool_call> | the chat template's tool message (<tool_response>) | <answer>a</answer> or the final message | tool_call.py |

`get_protocol(name, agent_cfg)` builds one, with the caps (query chars, passage words) and the prompt
style (`agent.prompt_style`, for the protocols that have more than one layout) from the config.
"""

from __future__ import annotations

from searchrl.agent.protocols.base import (
    CJK_RE,
    QUERY_CLEANING,
    Action,
    Protocol,
    clean_query,
    passage_view,
    sanitize_passage,
    strip_control_text,
    truncate_words,
    word_count,
)
from searchrl.agent.protocols.r1searcher import PP_SYSTEM, R1_SYSTEM, R1Searcher, R1SearcherPP
from searchrl.agent.protocols.search_r1 import SearchR1
from searchrl.agent.protocols.tool_call import SEARCH_TOOL, ToolCall

__all__ = ["CJK_RE", "PP_SYSTEM", "PROTOCOLS", "QUERY_CLEANING", "R1_SYSTEM", "SEARCH_TOOL", "Action", "Protocol",
           "R1Searcher", "R1SearcherPP", "SearchR1", "ToolCall", "clean_query", "get_protocol", "passage_view",
           "sanitize_passage", "strip_control_text", "truncate_words", "word_count"]

PROTOCOLS: dict[str, type[Protocol]] = {"r1searcher_pp": R1SearcherPP, "r1searcher": R1Searcher,
                                        "search_r1": SearchR1, "tool_call": ToolCall}


def get_protocol(name: str, agent_cfg=None, **kw) -> Protocol:
    """Protocol by name; caps (query chars, passage words) and the prompt style from agent_cfg when
    given. `agent.prompt_style` applies to the protocols that offer it (R1-Searcher's reference
    layouts); a protocol with one layout keeps it. An explicit `prompt_style=` it lacks is an error."""
    if name not in PROTOCOLS:
        raise ValueError(f"agent.protocol: unknown protocol '{name}' (known: {', '.join(PROTOCOLS)})")
    cls = PROTOCOLS[name]
    if agent_cfg is not None:
        kw.setdefault("max_query_chars", agent_cfg.max_query_chars)
        kw.setdefault("max_passage_words", agent_cfg.max_passage_words)
        style = getattr(agent_cfg, "prompt_style", None)
        if style in cls.prompt_styles:
            kw.setdefault("prompt_style", style)
    return cls(**kw)
