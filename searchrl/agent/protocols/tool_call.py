"""The tool-call protocol: a `search` tool in the tokenizer's own chat template, so a tool-calling
chat model (Qwen2.5-Instruct and other Hermes-style templates) searches the way it was trained to,
without a tag set of ours.

    prompt: our system message + the question, rendered by the chat template with `tools=[SEARCH_TOOL]`
    model:  ... <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>
    env:    the template's own continuation after the call: the rest of the assistant turn, the tool
            message holding the passages, and the next assistant turn's header. For Qwen2.5:
            "<|im_end|>\\n<|im_start|>user\\n<tool_response>\\n(1) Title: text\\n...\\n</tool_response>
            <|im_end|>\\n<|im_start|>assistant\\n"
    answer: <answer>short</answer> as the system message asks, or else the final assistant message's
            text (what a tool-calling model writes when it is done; it ends with EOS).

The env frame is read from the template at `bind(tokenizer)` (called by `prompt_ids`): the template
renders a conversation with one assistant tool call, and again with a tool message holding a marker
after it; the text after "</tool_call>" in the first plus the second's extra text around the marker
is the frame. A template that does not render tools, does not write calls as
<tool_call>...</tool_call> or results inside <tool_response>...</tool_response> is refused at `bind`
with one line. Before `bind`, the frame is ChatML's (Qwen2.5's), so text-only validation works.

The stop string is "</tool_call>": the model's tokens end with the call, and the "<|im_end|>" that
would close its turn is the first token of the env block (the template's text, masked). Only the
first call of a turn is run (parallel calls are not). The query is read from the call's JSON
("arguments" may also be a JSON string, as some servers send it); a call that is not JSON, names
another tool or has no string "query" ends the rollout as malformed. An empty query is not fatal (a
notice is inserted, as in R1-Searcher++).
"""

from __future__ import annotations

import json

from searchrl.agent.protocols.base import Action, Protocol
from searchrl.errors import ConfigError

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search a collection of documents and return the passages most relevant to the query.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string",
                                     "description": "A short keyword query about a single fact."}},
            "required": ["query"],
        },
    },
}
TOOL_SYSTEM = """You answer questions by reasoning step by step. When you need a fact you are not sure of, call the search tool with a short keyword query about that one fact; you may search several times, one call at a time. When you know the answer, write it inside <answer> and </answer>. The answer must be short: a name, a date, a number or a few words, not a sentence."""

# ChatML (Qwen2.5) frame: the default before bind()
CHATML_HEAD = "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
CHATML_TAIL = "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_MARK = "\x00MARK\x00"


class ToolCall(Protocol):
    name = "tool_call"
    query_open, query_close = "<tool_call>", "</tool_call>"
    doc_open, doc_close = "<tool_response>", "</tool_response>"
    tool_name = "search"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.env_head, self.env_tail = CHATML_HEAD, CHATML_TAIL
        self.frame_tokens: tuple[str, ...] = ("<|im_end|>", "<|im_start|>")
        self._bound_template: str | None = None

    @property
    def tags(self) -> tuple[str, ...]:
        return (*super().tags, *self.frame_tokens)

    def system_prompt(self) -> str:
        return TOOL_SYSTEM

    # -- the chat template
    def bind(self, tokenizer) -> None:
        """Read the env frame from the tokenizer's chat template (see the module docstring)."""
        from searchrl.agent.tokens import added_tokens, render_chat

        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ConfigError("agent.protocol tool_call: the tokenizer has no chat template; the protocol needs "
                              "one that renders tools (e.g. Qwen2.5-Instruct's)")
        if template == self._bound_template:
            return
        base = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
        call = {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": self.tool_name,
                                                                 "arguments": {"query": "q"}}}]}
        try:
            with_tools = render_chat(tokenizer, base, tools=[SEARCH_TOOL])
            without = render_chat(tokenizer, base)
            first = render_chat(tokenizer, [*base, call], tools=[SEARCH_TOOL], add_generation_prompt=False)
            second = render_chat(tokenizer, [*base, call, {"role": "tool", "name": self.tool_name, "content": _MARK}],
                                 tools=[SEARCH_TOOL])
        except Exception as err:  # noqa: BLE001 - a template error is the user's to fix
            raise ConfigError(f"agent.protocol tool_call: the chat template cannot render a tool call "
                              f"({type(err).__name__}: {err})".replace("\n", " ")) from None
        if with_tools == without:
            raise ConfigError("agent.protocol tool_call: the tokenizer's chat template ignores tools (it renders "
                              "the same prompt with and without a tool schema)")
        close = first.rfind(self.query_close)
        if close < 0 or not second.startswith(first) or second.count(_MARK) != 1:
            raise ConfigError("agent.protocol tool_call: the chat template does not write tool calls as "
                              "<tool_call>...</tool_call> followed by the tool message (Qwen2.5 / Hermes style)")
        extra = second[len(first):]
        head = first[close + len(self.query_close):] + extra[: extra.index(_MARK)]
        tail = extra[extra.index(_MARK) + len(_MARK):]
        if self.doc_open not in head or self.doc_close not in tail:
            raise ConfigError("agent.protocol tool_call: the chat template does not put tool results inside "
                              "<tool_response>...</tool_response>")
        self.env_head, self.env_tail = head, tail
        self.frame_tokens = tuple(t for t in added_tokens(tokenizer) if t in head or t in tail)
        self._bound_template = template

    def prompt_ids(self, tokenizer, question: str) -> tuple[str, list[int]]:
        from searchrl.agent.backends import decode
        from searchrl.agent.tokens import fill_prompt_ids, render_chat

        self.bind(tokenizer)
        frame = render_chat(tokenizer, [{"role": "system", "content": TOOL_SYSTEM},
                                        {"role": "user", "content": _MARK}], tools=[SEARCH_TOOL])
        ids = fill_prompt_ids(tokenizer, frame, _MARK, self.user_message(question))
        return decode(tokenizer, ids), ids

    # -- reading the model's segment
    def query_action(self, raw: str) -> Action:
        """The search action of one tool call's JSON body, or bad_query naming what is wrong."""
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            return Action("bad_query", None, "tool call is not JSON")
        if not isinstance(call, dict):
            return Action("bad_query", None, "tool call is not a JSON object")
        if call.get("name") != self.tool_name:
            return Action("bad_query", None, f"unknown tool {str(call.get('name'))[:40]!r}")
        args = call.get("arguments", call.get("parameters"))
        if isinstance(args, str):  # some servers / models send the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return Action("bad_query", None, "tool call arguments are not JSON")
        if not isinstance(args, dict) or not isinstance(args.get("query"), str):
            return Action("bad_query", None, "tool call without a string 'query' argument")
        return Action("search", self.clean_query(args["query"]))

    def extract_answer(self, model_text: str) -> str | None:
        """The last <answer>...</answer> (raw), else the final assistant message: the model's text after
        its last tool call, stripped (None when empty or an unfinished call)."""
        tagged = super().extract_answer(model_text)
        if tagged is not None:
            return tagged
        final = model_text[model_text.rfind(self.query_close) + len(self.query_close):] \
            if self.query_close in model_text else model_text
        final = final.strip()
        if not final or self.query_open in final or self.answer_open in final:
            return None
        return final

    # -- what the environment inserts
    def format_passage(self, i: int, title: str, text: str) -> str:
        return f"({i}) {title}: {text}" if title else f"({i}) {text}"

    def documents_text(self, hits, extra_tokens=()) -> str:
        lines = [self._passage_line(i, h, extra_tokens) for i, h in enumerate(hits, 1)] or ["(no results)"]
        return self.env_head + "\n".join(lines) + self.env_tail

    def empty_query_text(self) -> str:
        return self.env_head + "(empty query: nothing was searched)" + self.env_tail

    def env_spans(self, text: str) -> list[tuple[int, int]]:
        return self._frame_spans(text, self.env_head, self.env_tail)

    # -- format checks
    def _validate(self, parts):
        errs: list[str] = self._self_written_documents(parts)
        model_text = "".join(t for r, t in parts if r == "model")
        n_open, n_close = model_text.count(self.query_open), model_text.count(self.query_close)
        if n_open != n_close:
            errs.append(f"tool call tags unbalanced: {n_open} {self.query_open} vs {n_close} {self.query_close}")
        pos = 0
        for i in range(1, n_close + 1):
            end = model_text.find(self.query_close, pos)
            raw = self.query_body(model_text[: end + len(self.query_close)])
            pos = end + len(self.query_close)
            act = self.query_action(raw) if raw is not None else Action("bad_query", None, "no <tool_call>")
            if act.kind == "bad_query":
                errs.append(f"tool call {i}: {act.detail}")
            elif not act.query:
                errs.append("empty query")
        if sum(1 for r, _ in parts if r == "env") > n_close:
            errs.append("more tool results than tool calls")
        a_open, a_close = model_text.count(self.answer_open), model_text.count(self.answer_close)
        answer = self.extract_answer(model_text)
        if a_open or a_close:
            if a_open != 1 or a_close != 1:
                errs.append(f"answer tags: {a_open} {self.answer_open} / {a_close} {self.answer_close} (need one each)")
            elif answer is not None and any(t in answer for t in (self.query_open, self.doc_open, "<answer")):
                errs.append("tags inside the answer")
        if answer is None:
            errs.append("answer missing")
        elif not answer.strip():
            errs.append("answer empty")
        last_role = parts[-1][0] if parts else "model"
        if answer is not None and last_role != "model":
            errs.append("answer is not at the end (the environment continued after it)")
        errs.extend(self._garbled(model_text))
        return errs
